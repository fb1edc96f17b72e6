//! Text in and out: request messages to token ids (the same query formatting as `kvzip run`
//! for requests on a context, the model's chat template otherwise) and stop strings on the
//! streamed output.

use std::sync::Arc;

use kvzip_templates::{ChatMessage, PromptIds, Tokenizer};

use crate::api::{message_text, ApiError, RequestMessage};

const ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// Turns requests into token ids for one model.
pub struct Prompter {
    /// The tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// KVzip prompt pieces (system prompt before the context, query postfix).
    pub prompt: PromptIds,
    /// Ids that end a turn (the model's EOS ids).
    pub stop_tokens: Vec<u32>,
}

fn checked_texts(
    messages: &[RequestMessage],
    field: &str,
) -> Result<Vec<(String, String)>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(field, "messages must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid_param(
                    &format!("{field}[{i}].role"),
                    format!(
                        "role {:?} is not served; use system, developer, user or assistant",
                        m.role
                    ),
                ));
            }
            Ok((m.role.clone(), message_text(m, i, field)?))
        })
        .collect()
}

fn capitalized(role: &str) -> String {
    let mut c = role.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// A conversation as a transcript: one `Role: content` block per message.
fn transcript(messages: &[(String, String)]) -> String {
    messages
        .iter()
        .map(|(r, c)| format!("{}: {c}", capitalized(r)))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Prompter {
    fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode(text)
            .map_err(|e| ApiError::internal(format!("tokenizer: {e}")))
    }

    /// Ids of a query on a compressed context, exactly as `kvzip run` sends a `--query` (as
    /// written, after the QA system prompt): a conversation of one user message is that
    /// question; a longer one is passed as its transcript.
    pub fn query_ids(&self, messages: &[RequestMessage]) -> Result<Vec<u32>, ApiError> {
        let texts = checked_texts(messages, "messages")?;
        if texts.last().is_none_or(|(r, _)| r != "user") {
            return Err(ApiError::invalid_param(
                "messages",
                "the last message must come from the user",
            ));
        }
        let question = match texts.as_slice() {
            [(_, only)] => only.clone(),
            many => transcript(many),
        };
        self.prompt
            .query_input_ids(&self.tokenizer, &question)
            .map_err(|e| ApiError::internal(format!("tokenizer: {e}")))
    }

    /// Ids of a plain chat completion (no context): the model's chat template with the
    /// generation prompt, as `kvzip generate` renders it.
    pub fn chat_ids(&self, messages: &[RequestMessage]) -> Result<Vec<u32>, ApiError> {
        let texts = checked_texts(messages, "messages")?;
        let msgs: Vec<ChatMessage> = texts
            .into_iter()
            .map(|(r, c)| ChatMessage::new(if r == "developer" { "system".into() } else { r }, c))
            .collect();
        let text = match self.tokenizer.chat_template() {
            Ok(t) => t
                .render(&msgs, true)
                .map_err(|e| ApiError::invalid_param("messages", format!("chat template: {e}")))?,
            Err(_) => {
                let turns: Vec<(String, String)> =
                    msgs.into_iter().map(|m| (m.role, m.content)).collect();
                format!("{}\nAssistant:", transcript(&turns))
            }
        };
        self.encode(&text)
    }

    /// Ids of a context to compress: `text`, or a conversation rendered as its transcript.
    pub fn context_ids(
        &self,
        text: Option<&str>,
        messages: Option<&[RequestMessage]>,
    ) -> Result<Vec<u32>, ApiError> {
        let text = match (text, messages) {
            (Some(t), None) => t.to_owned(),
            (None, Some(m)) => transcript(&checked_texts(m, "messages")?),
            _ => {
                return Err(ApiError::invalid(
                    "give exactly one of text or messages: the context to compress",
                ))
            }
        };
        if text.trim().is_empty() {
            return Err(ApiError::invalid_param("text", "the context is empty"));
        }
        self.encode(&text)
    }
}

/// Cuts streamed text at the first stop string, holding back text that may be the start of
/// one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// Whether a stop string was seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds `delta`; returns the text that is safe to emit now.
    pub fn push(&mut self, delta: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(delta);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.stopped = true;
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return out;
        }
        // Hold back the longest suffix that is a proper prefix of a stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        out
    }

    /// The held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            out += &m.push(d);
        }
        out += &m.finish();
        (out, m.stopped())
    }

    #[test]
    fn stop_strings_cut_across_deltas() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
        assert_eq!(
            run(&["END"], &["hello E", "nd"]),
            ("hello End".into(), false)
        );
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["\n\n", "x"], &["ab\n", "\ncd"]), ("ab".into(), true));
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
    }
}
