//! [`ChatTemplate`]: HF chat templates (Jinja) rendered with minijinja the way transformers'
//! `apply_chat_template(tokenize=False)` renders them.

use std::collections::BTreeMap;

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::{Result, TemplateError};
use crate::python_compat::{python_str, strftime_now, tojson_filter};

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message, `{"role": ..., "content": ...}` as templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Instruction budget of one render (minijinja fuel).
pub const TEMPLATE_FUEL: u64 = 2_000_000;

/// A compiled chat template.
///
/// Rendering matches transformers: `trim_blocks` and `lstrip_blocks` on, trailing newline of the
/// template dropped, Python string methods (`.strip()`, `.startswith()`, `.split()`, ...),
/// `raise_exception(msg)` as an error, HF's `tojson` (no HTML escaping, `ensure_ascii=False`,
/// `indent`), `strftime_now(fmt)` (UTC), `tools`/`documents` = none, Python's printing of
/// `None`/`True`/`False`, and `{% generation %}` blocks rendered as plain blocks.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source` (Jinja text of `chat_template`); `bos_token`/`eos_token` are exposed to the
    /// template under those names.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        // Hostile templates (endless loops, deep recursion) stop with an error instead of
        // running forever: real chat templates use a few thousand instructions.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(64);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, state, value| {
            if matches!(
                value.kind(),
                minijinja::value::ValueKind::String | minijinja::value::ValueKind::Undefined
            ) {
                minijinja::escape_formatter(out, state, value)
            } else {
                out.write_str(&python_str(value)).map_err(Error::from)
            }
        });
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_filter("tojson", tojson_filter);
        env.add_template_owned(TEMPLATE_NAME, neutralize_generation_tags(source))?;
        Ok(Self {
            env,
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        })
    }

    /// Renders `messages`; with `add_generation_prompt` the assistant header is appended.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// Like [`Self::render`], with extra template variables (e.g. `{"enable_thinking": false}` for
    /// Qwen3), passed like `apply_chat_template(..., **extra)`.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let mut context: BTreeMap<String, Value> = BTreeMap::new();
        for (key, value) in extra {
            context.insert(key.clone(), Value::from_serialize(value));
        }
        context.insert("messages".into(), Value::from_serialize(messages));
        context.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        context.insert("tools".into(), Value::from(()));
        context.insert("documents".into(), Value::from(()));
        if let Some(bos) = &self.bos_token {
            context.insert("bos_token".into(), Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            context.insert("eos_token".into(), Value::from(eos.as_str()));
        }
        let template = self.env.get_template(TEMPLATE_NAME)?;
        template.render(context).map_err(TemplateError::from)
    }

    /// The `bos_token` the template sees.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The `eos_token` the template sees.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
}

/// Rewrites HF's `{% generation %}` / `{% endgeneration %}` (assistant-mask markers that only
/// transformers knows) into `{% if true %}` / `{% endif %}`, keeping whitespace control.
fn neutralize_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // The closing `%}` comes after the opening `{%` (in `{%}` they overlap).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open_ws, body) = split_ws_control_front(inner);
        let (body, close_ws) = split_ws_control_back(body);
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(word) => out.push_str(&format!("{{%{open_ws} {word} {close_ws}%}}")),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn split_ws_control_front(inner: &str) -> (&str, &str) {
    match inner.chars().next() {
        Some(c @ ('-' | '+')) => inner.split_at(c.len_utf8()),
        _ => ("", inner),
    }
}

fn split_ws_control_back(inner: &str) -> (&str, &str) {
    match inner.chars().last() {
        Some(c @ ('-' | '+')) => inner.split_at(inner.len() - c.len_utf8()),
        _ => (inner, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_plain_blocks() {
        let source = "{%- for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration %}{% endfor %}";
        let template = ChatTemplate::new(source, None, None).unwrap();
        let out = template
            .render(&[ChatMessage::new("assistant", "hi")], false)
            .unwrap();
        assert_eq!(out, "hi");
    }

    #[test]
    fn raise_exception_is_an_error_with_the_message() {
        let template =
            ChatTemplate::new("{{ raise_exception('no system role') }}", None, None).unwrap();
        let err = template.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
    }

    #[test]
    fn python_printing_and_strftime() {
        let source = "{{ tools }} {{ add_generation_prompt }} {{ [1, 'a'] }} {{ strftime_now('%Y') | length }}";
        let template = ChatTemplate::new(source, None, None).unwrap();
        assert_eq!(template.render(&[], true).unwrap(), "None True [1, 'a'] 4");
    }
}
