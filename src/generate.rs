//! The generation loop, pulled one token at a time (so a caller can stop between tokens):
//! prefill the prompt, then decode_one until EOS, a stop string, max_new_tokens or a full context.

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::engine::Engine;
use crate::error::Result;
use crate::sampler::{Sampler, SamplingOptions};
use crate::session::Session;
use crate::text::{DecodeStream, Message};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    #[serde(flatten)]
    pub sampling: SamplingOptions,
    /// Generation stops when the text contains one of these (it is not emitted).
    pub stop: Vec<String>,
    /// Keep going through EOS (benchmarks: always exactly max_new_tokens).
    pub ignore_eos: bool,
    /// Wrap the prompt in the model's chat template as one user message.
    pub chat: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 64, sampling: SamplingOptions::default(), stop: vec![],
                          ignore_eos: false, chat: false }
    }
}

/// One new token: its id, the text it completes (may be empty mid-character), and the engine
/// time it took (for the first token: prefill + sampling, i.e. time to first token).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenEvent {
    pub id: u32,
    pub text: String,
    pub ms: f64,
    pub prefill: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
}

/// What a generation feeds before its first token.
enum Input {
    /// Tokens after what the cache holds; none: continue from the cache's last token.
    Append(Vec<u32>),
    /// A whole conversation: the cache keeps its longest common prefix, the rest is fed
    /// (`Session::sync`).
    Whole(Vec<u32>),
}

/// A prefill under way: the tokens to feed (after what the cache kept), how many are in, and
/// the logits after the last chunk.
struct Prefill {
    ids: Vec<u32>,
    at: usize,
    logits: Option<Vec<f32>>,
    t0: f64,
}

pub struct Generation {
    opts: GenerateOptions,
    sampler: Sampler,
    input: Input,
    prefill: Option<Prefill>,
    /// Tokens the first call actually ran (a chat's new turn only), once it has.
    fed: Option<usize>,
    /// Per token: engine ms, and whether it was the first (prefill).
    times: Vec<(f64, bool)>,
    last: Option<u32>,
    produced: usize,
    stream: DecodeStream,
    text: String,
    emitted: usize,
    pub stopped: Option<StopReason>,
}

impl Generation {
    /// Tokenize the prompt (through the chat template if asked), to be fed after what the cache
    /// holds; nothing runs yet. An empty prompt continues from the cache.
    pub fn new(engine: &Engine, prompt: &str, opts: GenerateOptions) -> Result<Generation> {
        let text = if opts.chat {
            engine.text.chat_prompt(&[Message { role: "user".into(), content: prompt.into() }])?
        } else {
            prompt.to_string()
        };
        let ids = engine.text.encode(&text)?;
        Generation::from_ids(ids, opts)
    }

    /// The assistant's next turn of a conversation, through the chat template: the cache keeps
    /// what it shares with the conversation's tokens and runs only the rest.
    pub fn chat(engine: &Engine, messages: &[Message], opts: GenerateOptions) -> Result<Generation> {
        let ids = engine.text.encode(&engine.text.chat_prompt(messages)?)?;
        Generation::with_input(Input::Whole(ids), opts)
    }

    pub fn from_ids(prompt: Vec<u32>, opts: GenerateOptions) -> Result<Generation> {
        Generation::with_input(Input::Append(prompt), opts)
    }

    fn with_input(input: Input, opts: GenerateOptions) -> Result<Generation> {
        let sampler = Sampler::new(opts.sampling.clone())?;
        Ok(Generation { opts, sampler, input, prefill: None, fed: None, times: vec![], last: None, produced: 0,
                        stream: DecodeStream::default(), text: String::new(), emitted: 0, stopped: None })
    }

    /// The prompt's tokens (a chat: the whole conversation's).
    pub fn prompt_tokens(&self) -> usize {
        match &self.input {
            Input::Append(ids) | Input::Whole(ids) => ids.len(),
        }
    }

    /// The tokens the prefill ran (a chat's new turn: those not already in the cache): all of
    /// them once the first token is out, so far while it runs in chunks.
    pub fn fed_tokens(&self) -> Option<usize> {
        self.fed.or(self.prefill.as_ref().map(|p| p.at))
    }

    /// Timing summary of the tokens so far.
    pub fn stats(&self) -> RunStats {
        RunStats::from_times(self.prompt_tokens(), &self.times)
    }

    /// Feed the next at most `chunk` tokens of the prefill; returns (tokens fed, of how many),
    /// or None once the prefill is done (then `next` gives the first token). A caller that
    /// stops between chunks (a cancel) leaves the cache holding what was fed. `next` runs what
    /// is left of the prefill at once: calling this is optional.
    ///
    /// The first call checks the context (refused with the cache as it was, but for a chat
    /// turn's cut to the common prefix) before anything runs.
    pub fn prefill_step(&mut self, session: &mut Session, chunk: usize) -> Result<Option<(usize, usize)>> {
        if self.last.is_some() || self.stopped.is_some() {
            return Ok(None);
        }
        if self.prefill.is_none() {
            let t0 = now_ms();
            let ids = match &self.input {
                Input::Append(ids) => {
                    session.room_for(ids.len())?;
                    ids.clone()
                }
                Input::Whole(ids) => ids[session.keep_common(ids)?..].to_vec(),
            };
            self.prefill = Some(Prefill { ids, at: 0, logits: None, t0 });
        }
        let p = self.prefill.as_mut().expect("set above");
        if p.at == p.ids.len() {
            if p.logits.is_none() {
                // nothing to feed: the cache already ends the prompt (or an empty one continues)
                p.logits = Some(session.logits()?);
            }
            return Ok(None);
        }
        let end = p.ids.len().min(p.at + chunk.max(1));
        p.logits = Some(session.prefill(&p.ids[p.at..end])?);
        p.at = end;
        Ok(Some((p.at, p.ids.len())))
    }

    /// The next token, or None once stopped (see `stopped` for why).
    pub fn next(&mut self, engine: &Engine, session: &mut Session) -> Result<Option<TokenEvent>> {
        if self.stopped.is_some() {
            return Ok(None);
        }
        if self.produced >= self.opts.max_new_tokens {
            return self.stop(StopReason::MaxTokens);
        }
        let mut t0 = now_ms();
        let logits = match self.last {
            Some(_) if session.len() >= session.context() => return self.stop(StopReason::ContextFull),
            Some(id) => session.step(id)?,
            None => {
                while self.prefill_step(session, usize::MAX)?.is_some() {}
                let p = self.prefill.take().expect("prefill_step set it");
                t0 = p.t0;
                self.fed = Some(p.ids.len());
                p.logits.expect("prefill_step left the logits")
            }
        };
        let id = self.sampler.sample(&logits, session.tokens());
        let ms = now_ms() - t0;
        let prefill = self.last.is_none();
        self.times.push((ms, prefill));
        self.last = Some(id);
        self.produced += 1;
        if !self.opts.ignore_eos && engine.eos_ids.contains(&id) {
            return self.stop(StopReason::Eos);
        }
        self.text.push_str(&engine.text.decode_step(&mut self.stream, id)?);
        let text = self.take_text();
        Ok(Some(TokenEvent { id, text, ms, prefill }))
    }

    /// New text since the last event, held back where it could be the start of a stop string.
    fn take_text(&mut self) -> String {
        let pending = &self.text[self.emitted..];
        if let Some(at) = self.opts.stop.iter().filter_map(|s| pending.find(s.as_str())).min() {
            let out = pending[..at].to_string();
            self.emitted = self.text.len();
            self.stopped = Some(StopReason::StopString);
            return out;
        }
        let mut keep = 0;
        for s in &self.opts.stop {
            for n in (1..s.len()).rev() {
                if s.is_char_boundary(n) && pending.ends_with(&s[..n]) {
                    keep = keep.max(n);
                    break;
                }
            }
        }
        let cut = pending.len() - keep;
        let out = pending[..cut].to_string();
        self.emitted += cut;
        out
    }

    fn stop(&mut self, why: StopReason) -> Result<Option<TokenEvent>> {
        self.stopped = Some(why);
        Ok(None)
    }
}

/// Timing summary of one generation, from its events.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub ttft_ms: f64,
    pub decode_ms_median: f64,
    pub decode_ms_p90: f64,
    pub tokens_per_s: f64,
}

impl RunStats {
    pub fn from_events(prompt_tokens: usize, events: &[TokenEvent]) -> RunStats {
        let times: Vec<(f64, bool)> = events.iter().map(|e| (e.ms, e.prefill)).collect();
        RunStats::from_times(prompt_tokens, &times)
    }

    /// From (ms, prefill) per token.
    pub fn from_times(prompt_tokens: usize, times: &[(f64, bool)]) -> RunStats {
        let ttft_ms = times.iter().find(|e| e.1).map(|e| e.0).unwrap_or(0.0);
        let mut decode: Vec<f64> = times.iter().filter(|e| !e.1).map(|e| e.0).collect();
        let total: f64 = decode.iter().sum();
        decode.sort_by(f64::total_cmp);
        RunStats {
            prompt_tokens,
            new_tokens: times.len(),
            ttft_ms,
            decode_ms_median: percentile(&decode, 50.0),
            decode_ms_p90: percentile(&decode, 90.0),
            tokens_per_s: if total > 0.0 { decode.len() as f64 * 1e3 / total } else { 0.0 },
        }
    }
}

/// Linear-interpolated percentile of sorted values (numpy's default), 0 for none.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}
