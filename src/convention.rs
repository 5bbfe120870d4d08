//! The graph's I/O convention, discovered from its input and output names, not assumed.
//!
//! Accepted: ours (`past_key_i`, `past_value_i` -> `present_key_i`, `present_value_i`) and
//! Optimum's (`past_key_values.i.key|value` -> `present.i.key|value`), with or without
//! `attention_mask` and `position_ids`; or no cache at all (`input_ids` -> `logits`).

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum Style {
    /// `past_key_<i>`, `past_value_<i>` -> `present_key_<i>`, `present_value_<i>`: our exporter's.
    PastKeyIndexed,
    /// `past_key_values.<i>.key|value` -> `present.<i>.key|value`: Optimum's.
    Optimum,
    /// `input_ids` -> `logits`, no cache.
    NoCache,
}

/// Positions of each role among the graph's inputs and outputs.
#[derive(Debug, Clone)]
pub struct Convention {
    pub style: Style,
    pub input_ids: usize,
    pub attention_mask: Option<usize>,
    pub position_ids: Option<usize>,
    /// (key, value) input positions, one pair per layer, layer order.
    pub past: Vec<(usize, usize)>,
    pub logits: usize,
    /// (key, value) output positions, one pair per layer.
    pub present: Vec<(usize, usize)>,
}

const EXPECTED: &str = "expected inputs input_ids [attention_mask] [position_ids] and, for a KV \
    cache, past_key_<i>/past_value_<i> (ours) or past_key_values.<i>.key/.value \
    (Optimum's); outputs logits and present_key_<i>/present_value_<i> or present.<i>.key/.value";

/// Parse "<prefix><layer><suffix>" -> layer.
fn layer_of(name: &str, prefix: &str, suffix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok()
}

fn pairs(names: &[String], key: (&str, &str), value: (&str, &str)) -> Result<Vec<(usize, usize)>> {
    let mut keys: Vec<(usize, usize)> = Vec::new();
    let mut values: Vec<(usize, usize)> = Vec::new();
    for (ix, n) in names.iter().enumerate() {
        if let Some(l) = layer_of(n, key.0, key.1) {
            keys.push((l, ix));
        } else if let Some(l) = layer_of(n, value.0, value.1) {
            values.push((l, ix));
        }
    }
    keys.sort();
    values.sort();
    let layers = keys.len();
    let complete = values.len() == layers
        && keys.iter().zip(&values).enumerate().all(|(i, (k, v))| k.0 == i && v.0 == i);
    if !complete {
        return Err(Error::UnsupportedGraph(format!(
            "the cache names do not form one key and one value per layer 0..{layers}: {names:?}"
        )));
    }
    Ok(keys.iter().zip(&values).map(|(k, v)| (k.1, v.1)).collect())
}

impl Convention {
    pub fn discover(inputs: &[String], outputs: &[String]) -> Result<Convention> {
        let find = |names: &[String], n: &str| names.iter().position(|x| x == n);
        let unsupported = |what: String| {
            Error::UnsupportedGraph(format!("{what}. {EXPECTED}. Found inputs {inputs:?}, outputs {outputs:?}"))
        };
        let input_ids = find(inputs, "input_ids").ok_or_else(|| unsupported("no input_ids input".into()))?;
        let logits = find(outputs, "logits").ok_or_else(|| unsupported("no logits output".into()))?;
        let style = if inputs.iter().any(|n| n.starts_with("past_key_values.")) {
            Style::Optimum
        } else if inputs.iter().any(|n| n.starts_with("past_key_") || n.starts_with("past_value_")) {
            Style::PastKeyIndexed
        } else {
            Style::NoCache
        };
        let (past, present) = match style {
            Style::PastKeyIndexed => (
                pairs(inputs, ("past_key_", ""), ("past_value_", ""))?,
                pairs(outputs, ("present_key_", ""), ("present_value_", ""))?,
            ),
            Style::Optimum => (
                pairs(inputs, ("past_key_values.", ".key"), ("past_key_values.", ".value"))?,
                pairs(outputs, ("present.", ".key"), ("present.", ".value"))?,
            ),
            Style::NoCache => (vec![], vec![]),
        };
        if past.len() != present.len() {
            return Err(unsupported(format!("{} past layers but {} present", past.len(), present.len())));
        }
        let conv = Convention {
            style,
            input_ids,
            attention_mask: find(inputs, "attention_mask"),
            position_ids: find(inputs, "position_ids"),
            past,
            logits,
            present,
        };
        let known = 1 + conv.attention_mask.is_some() as usize + conv.position_ids.is_some() as usize
            + 2 * conv.past.len();
        if known != inputs.len() {
            return Err(unsupported("inputs the engine would not know how to feed".into()));
        }
        Ok(conv)
    }

    pub fn layers(&self) -> usize {
        self.past.len()
    }

    pub fn has_cache(&self) -> bool {
        self.style != Style::NoCache
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn past_key_indexed_convention() {
        let c = Convention::discover(
            &s(&["input_ids", "past_key_0", "past_key_1", "past_value_0", "past_value_1"]),
            &s(&["logits", "present_key_0", "present_key_1", "present_value_0", "present_value_1"]),
        )
        .unwrap();
        assert_eq!(c.style, Style::PastKeyIndexed);
        assert_eq!(c.past, vec![(1, 3), (2, 4)]);
        assert_eq!(c.present, vec![(1, 3), (2, 4)]);
    }

    #[test]
    fn optimum_convention_with_mask_and_positions() {
        let c = Convention::discover(
            &s(&["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                "past_key_values.0.value"]),
            &s(&["logits", "present.0.key", "present.0.value"]),
        )
        .unwrap();
        assert_eq!(c.style, Style::Optimum);
        assert_eq!((c.attention_mask, c.position_ids), (Some(1), Some(2)));
        assert_eq!(c.past, vec![(3, 4)]);
    }

    #[test]
    fn refuses_unknown_names_saying_what_was_expected() {
        let e = Convention::discover(&s(&["pixel_values"]), &s(&["logits"])).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("no input_ids") && msg.contains("past_key_<i>") && msg.contains("pixel_values"));
        let e = Convention::discover(&s(&["input_ids", "past_key_0"]), &s(&["logits", "present_key_0"]))
            .unwrap_err();
        assert!(e.to_string().contains("one key and one value per layer"));
        let e = Convention::discover(&s(&["input_ids", "token_type_ids"]), &s(&["logits"])).unwrap_err();
        assert!(e.to_string().contains("would not know how to feed"));
    }
}
