//! Next-token choice: greedy, or temperature / top-k / top-p sampling with a repetition penalty,
//! drawn from PCG32 (O'Neill's pcg32, XSH-RR): integer-only, so a seed gives the same tokens
//! natively and in wasm.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingOptions {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 1.0 = off; > 1 discourages tokens already in the context (CTRL's rule).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingOptions {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Options(m.into()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty must be > 0");
        }
        Ok(())
    }
}

/// PCG32 (pcg32_random_r from pcg-random.org), seeded with the reference's stream constant.
#[derive(Debug, Clone)]
pub struct Pcg32 {
    state: u64,
    inc: u64,
}

impl Pcg32 {
    pub fn new(seed: u64) -> Pcg32 {
        Pcg32::with_stream(seed, 0xda3e39cb94b95bdb)
    }

    /// pcg32_srandom_r(initstate, initseq).
    pub fn with_stream(seed: u64, stream: u64) -> Pcg32 {
        let mut rng = Pcg32 { state: 0, inc: (stream << 1) | 1 };
        rng.next_u32();
        rng.state = rng.state.wrapping_add(seed);
        rng.next_u32();
        rng
    }

    pub fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(6364136223846793005).wrapping_add(self.inc);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        xorshifted.rotate_right((old >> 59) as u32)
    }

    /// Uniform in [0, 1) with 24 bits: exact in f32 everywhere.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
}

pub struct Sampler {
    opts: SamplingOptions,
    rng: Pcg32,
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Result<Sampler> {
        opts.validate()?;
        Ok(Sampler { rng: Pcg32::new(opts.seed), opts })
    }

    /// Choose the next token from `logits`, given the tokens already in the context.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        if self.opts.temperature == 0.0 && self.opts.repetition_penalty == 1.0 {
            return argmax(logits); // plain greedy: no copy of the logits on the per-token path
        }
        let mut logits = logits.to_vec();
        penalize(&mut logits, context, self.opts.repetition_penalty);
        if self.opts.temperature == 0.0 {
            return argmax(&logits);
        }
        let candidates = self.candidates(&logits);
        let r = self.rng.next_f32() * candidates.iter().map(|c| c.1).sum::<f32>();
        let mut acc = 0.0;
        for &(id, p) in &candidates {
            acc += p;
            if r < acc {
                return id;
            }
        }
        candidates.last().map(|c| c.0).unwrap_or(0)
    }

    /// (token, unnormalized probability) for the tokens top-k and top-p keep, most likely first.
    pub fn candidates(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let t = self.opts.temperature;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) / t).exp())).collect();
        // Stable order: probability, then token id, so ties break the same everywhere. A total
        // order, so selecting the top k first and sorting only them gives the same list as
        // sorting the whole vocabulary (O(V) instead of O(V log V) per token).
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.opts.top_k;
        if k > 0 && k < probs.len() {
            probs.select_nth_unstable_by(k - 1, order);
            probs.truncate(k);
        }
        probs.sort_by(order);
        if self.opts.top_p < 1.0 {
            let total: f32 = probs.iter().map(|p| p.1).sum();
            let (mut acc, mut keep) = (0.0, 0);
            for p in &probs {
                acc += p.1 / total;
                keep += 1;
                if acc >= self.opts.top_p {
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        probs
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn penalize(logits: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in context {
        if let Some(s) = seen.get_mut(t as usize) {
            if !*s {
                *s = true;
                let l = &mut logits[t as usize];
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingOptions {
        SamplingOptions { temperature, top_k, top_p, repetition_penalty: 1.0, seed }
    }

    fn logits() -> Vec<f32> {
        (0..50).map(|i| ((i * 37 % 50) as f32) / 7.0).collect()
    }

    #[test]
    fn pcg32_matches_the_reference_demo() {
        // pcg-c-basic's pcg32-demo: pcg32_srandom_r(&rng, 42u, 54u), first six outputs.
        let mut rng = Pcg32::with_stream(42, 54);
        let got: Vec<u32> = (0..6).map(|_| rng.next_u32()).collect();
        assert_eq!(got, [0xa15c02b7, 0x7b47f409, 0xba1d3330, 0x83d2f293, 0xbfa4784b, 0xcbed606e]);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let run = |seed| {
            let mut s = Sampler::new(opts(1.0, 0, 1.0, seed)).unwrap();
            (0..64).map(|_| s.sample(&logits(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_never_pick_outside_their_set() {
        let l = logits();
        let mut order: Vec<u32> = (0..50).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
        let mut s = Sampler::new(opts(2.0, 3, 1.0, 1)).unwrap();
        for _ in 0..500 {
            assert!(order[..3].contains(&s.sample(&l, &[])));
        }
        let mut s = Sampler::new(opts(1.0, 0, 0.5, 2)).unwrap();
        let allowed: Vec<u32> = s.candidates(&l).iter().map(|c| c.0).collect();
        assert!(allowed.len() < 50 && !allowed.is_empty());
        for _ in 0..500 {
            assert!(allowed.contains(&s.sample(&l, &[])));
        }
    }

    #[test]
    fn top_k_selection_equals_the_full_sort_ties_included() {
        // Many ties (values repeat every 7 ids), so the id tie-break decides the order.
        let l: Vec<f32> = (0..200).map(|i| ((i * 13 % 7) as f32) / 3.0).collect();
        let full = Sampler::new(opts(0.8, 0, 1.0, 0)).unwrap().candidates(&l);
        for k in [1, 5, 29, 199, 200, 500] {
            let top = Sampler::new(opts(0.8, k, 1.0, 0)).unwrap().candidates(&l);
            assert_eq!(top, full[..k.min(200)].to_vec(), "k = {k}");
        }
    }

    #[test]
    fn greedy_is_argmax_and_penalty_moves_it() {
        let l = vec![0.1, 3.0, 2.9, -1.0];
        let mut g = Sampler::new(SamplingOptions::default()).unwrap();
        assert_eq!(g.sample(&l, &[]), 1);
        let mut p = Sampler::new(SamplingOptions { repetition_penalty: 1.5, ..Default::default() }).unwrap();
        assert_eq!(p.sample(&l, &[1]), 2);
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(Sampler::new(opts(-1.0, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(opts(1.0, 0, 0.0, 0)).is_err());
    }
}
