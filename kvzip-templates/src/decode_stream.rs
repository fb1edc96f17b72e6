//! Incremental detokenization for streaming generation.

use std::borrow::Borrow;

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Turns token ids, pushed one at a time, into text deltas whose concatenation equals
/// `tokenizer.decode(all_ids, skip_special_tokens)`.
///
/// A delta is only released once the decoded text does not end in U+FFFD, so a multi-byte UTF-8
/// character split over several byte-level (or byte-fallback) tokens comes out whole. One token of
/// already-emitted context is kept and decoded again, so decoders that treat the first token
/// specially (leading-space stripping) see the same neighbourhood as a full decode.
///
/// `T` is how the stream holds the tokenizer: `&Tokenizer` ([`Tokenizer::decode_stream`]) or
/// an owning handle such as `Arc<Tokenizer>` for streams that outlive a borrow (a server's
/// per-request task).
#[derive(Debug, Clone)]
pub struct DecodeStream<T: Borrow<Tokenizer>> {
    tokenizer: T,
    skip_special_tokens: bool,
    /// Ids not yet dropped; `ids[..prefix_offset]` are no longer needed.
    ids: Vec<u32>,
    /// Start of the context window that is decoded again.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
}

impl<T: Borrow<Tokenizer>> DecodeStream<T> {
    /// A fresh stream over `tokenizer`.
    pub fn new(tokenizer: T, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one id; returns the new text, or `None` while the text is incomplete (a partial UTF-8
    /// character) or the id produced no text (a skipped special token).
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix_text = self.decode(self.prefix_offset, self.read_offset)?;
        let text = self.decode(self.prefix_offset, self.ids.len())?;
        if text.len() <= prefix_text.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let delta = delta_after(&prefix_text, &text);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        Ok(Some(delta))
    }

    /// Releases whatever text is still held back (e.g. a truncated UTF-8 sequence at the end of
    /// generation, rendered as U+FFFD) and resets the stream. Returns `None` if nothing is pending.
    pub fn flush(&mut self) -> Result<Option<String>> {
        let prefix_text = self.decode(self.prefix_offset, self.read_offset)?;
        let text = self.decode(self.prefix_offset, self.ids.len())?;
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        if text.len() <= prefix_text.len() {
            return Ok(None);
        }
        Ok(Some(delta_after(&prefix_text, &text)))
    }

    fn decode(&self, start: usize, end: usize) -> Result<String> {
        if start >= end {
            return Ok(String::new());
        }
        self.tokenizer
            .borrow()
            .decode(&self.ids[start..end], self.skip_special_tokens)
    }
}

/// The part of `text` after `prefix`; if a decoder rewrote the shared part, the part after the
/// longest common prefix (on a character boundary).
fn delta_after(prefix: &str, text: &str) -> String {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest.to_string();
    }
    let common = prefix
        .char_indices()
        .zip(text.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prefix.len().min(text.len()), |((i, _), _)| i);
    text[common..].to_string()
}
