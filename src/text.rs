//! Text <-> tokens: the `tokenizers` crate (built without its C regex engine, as in wasm, so both
//! builds split text the same way), the model's chat template (minijinja), and a streaming
//! decoder that never emits a broken UTF-8 sequence.

use serde::{Deserialize, Serialize};
use tokenizers::tokenizer::step_decode_stream;

use crate::error::{Error, Result};

pub struct Text {
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Text {
    pub fn from_bytes(tokenizer_json: &[u8], chat_template: Option<String>) -> Result<Text> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| Error::Tokenizer(format!("tokenizer.json could not be read: {e}")))?;
        Ok(Text { tokenizer, chat_template })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The id of a token written as is (e.g. "<|im_end|>"), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The chat template rendered with a generation prompt, as transformers' apply_chat_template.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<String> {
        let source = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Template("this model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        // a template is code from the model's files: bounded (a few thousand instructions render a
        // long conversation)
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", source).map_err(|e| Error::Template(e.to_string()))?;
        let ctx = minijinja::context! { messages => messages, add_generation_prompt => true,
                                        bos_token => "", eos_token => "" };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| Error::Template(e.to_string()))
    }

    /// Incremental detokenization: the new complete characters that `id` adds, if any.
    pub fn decode_step(&self, stream: &mut DecodeStream, id: u32) -> Result<String> {
        let s = stream;
        step_decode_stream(&self.tokenizer, vec![id], true, &mut s.ids, &mut s.prefix, &mut s.prefix_index)
            .map(Option::unwrap_or_default)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// The instructions a chat template may run for one prompt (minijinja's fuel).
pub const TEMPLATE_FUEL: u64 = 1_000_000;

/// The state of one incremental detokenization (owned, so a generation can keep it).
#[derive(Debug, Default, Clone)]
pub struct DecodeStream {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}
