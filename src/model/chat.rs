//! Chat prompts, rendered from the model's own Jinja chat template (GGUF
//! `tokenizer.chat_template`, or `chat_template` in `tokenizer_config.json`) as transformers'
//! `apply_chat_template` renders it.
//!
//! The template runs in [`minijinja`] configured like transformers' sandboxed Jinja
//! environment: `trim_blocks` and `lstrip_blocks` on, the loop controls (`break`, `continue`),
//! Python's string, list and dict methods (`.strip()`, `.split()`, `.items()`, ... through
//! `minijinja_contrib::pycompat`), `raise_exception(msg)`, `strftime_now(format)` (the current
//! date, UTC, as Llama 3.2's template uses it: as with transformers, such a template's prompts
//! change with the day), and a `tojson` filter that writes what Python's
//! `json.dumps(..., ensure_ascii=False)` writes. The context holds `messages` (`role`, `content`),
//! `add_generation_prompt`, `tools` and `documents` (none), the special tokens `bos_token`,
//! `eos_token` (and `pad_token`) as strings, and the caller's extra variables
//! ([`ChatTemplate::with_kwargs`]: `apply_chat_template`'s `**kwargs`, such as Qwen3's
//! `enable_thinking`).
//!
//! The rendered text is tokenized as a whole, special tokens parsed and no BOS added: what
//! `apply_chat_template(..., tokenize=True)` does (templates that want BOS, like Llama 3's,
//! write `bos_token` themselves).
//!
//! SmolLM2-Instruct's template (ChatML with a default system prompt) is
//! [`SMOLLM2_CHAT_TEMPLATE`]; Meta Llama 3 Instruct's is [`LLAMA3_CHAT_TEMPLATE`].

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The default system prompt of SmolLM2-Instruct's template.
pub const SMOLLM2_SYSTEM_PROMPT: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// The Jinja chat template shipped with SmolLM2-Instruct (as in its GGUF metadata).
pub const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The chat template of Meta Llama 3 Instruct (8B, 70B): a header per message, content trimmed,
/// `<|eot_id|>` after each, BOS before the first.
pub const LLAMA3_CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template with the special tokens it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    /// The Jinja source.
    pub source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    /// Extra template variables ([`ChatTemplate::with_kwargs`]).
    kwargs: serde_json::Map<String, serde_json::Value>,
    env: minijinja::Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("kwargs", &self.kwargs)
            .finish()
    }
}

impl PartialEq for ChatTemplate {
    fn eq(&self, o: &Self) -> bool {
        (&self.source, &self.bos_token, &self.eos_token, &self.pad_token, &self.kwargs)
            == (&o.source, &o.bos_token, &o.eos_token, &o.pad_token, &o.kwargs)
    }
}

const NAME: &str = "chat_template";

/// The most work (minijinja's fuel: about one unit per instruction) one rendering may take.
pub const TEMPLATE_FUEL: u64 = 50_000_000;

impl ChatTemplate {
    /// SmolLM2-Instruct's template.
    pub fn smollm2() -> Self {
        Self::from_jinja(SMOLLM2_CHAT_TEMPLATE).expect("SmolLM2's template compiles")
    }

    /// Compiles a Jinja chat template (see the module docs). A syntax error is an
    /// [`Error::Invalid`] on `chat_template` with minijinja's message (line and cause).
    pub fn from_jinja(src: &str) -> Result<Self> {
        Self::parse(src).map_err(|m| Error::invalid("chat_template", m))
    }

    /// The same template with the model's special tokens (`bos_token`, `eos_token`,
    /// `pad_token` in the template's context; an absent one is none there).
    pub fn with_special_tokens(mut self, bos: Option<String>, eos: Option<String>, pad: Option<String>) -> Self {
        self.bos_token = bos;
        self.eos_token = eos;
        self.pad_token = pad;
        self
    }

    /// The variables a template sees besides the caller's [`ChatTemplate::with_kwargs`].
    pub const CONTEXT: [&'static str; 7] =
        ["messages", "add_generation_prompt", "tools", "documents", "bos_token", "eos_token", "pad_token"];

    /// The same template with extra variables in its context, as `apply_chat_template(...,
    /// **kwargs)` passes them (Qwen3's `{"enable_thinking": false}` asks for answers without
    /// a thinking block). A name the context already holds ([`ChatTemplate::CONTEXT`]) is an
    /// [`Error::Invalid`] on `chat_template_kwargs`.
    pub fn with_kwargs(mut self, kwargs: serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        if let Some(k) = kwargs.keys().find(|k| Self::CONTEXT.contains(&k.as_str())) {
            return Err(Error::invalid(
                "chat_template_kwargs",
                format!("{k:?} is set by the chat itself (reserved: {:?})", Self::CONTEXT),
            ));
        }
        self.kwargs = kwargs;
        Ok(self)
    }

    /// [`ChatTemplate::from_jinja`] with the error as a bare message.
    pub(crate) fn parse(src: &str) -> std::result::Result<Self, String> {
        let mut env = minijinja::Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| e.to_string())?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A template comes from a model file: bound its work, so that a hostile one fails
        // instead of running for ever (a 1000-message chat with Llama 3.1's template uses
        // about a hundred thousand units).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function("raise_exception", |msg: String| -> std::result::Result<(), minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> std::result::Result<String, minijinja::Error> {
            use std::fmt::Write;
            let mut s = String::new();
            write!(s, "{}", chrono::Utc::now().format(&fmt)).map_err(|_| {
                minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("bad strftime format {fmt:?}"))
            })?;
            Ok(s)
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, src.to_string()).map_err(|e| describe(&e))?;
        Ok(ChatTemplate {
            source: src.to_string(),
            bos_token: None,
            eos_token: None,
            pad_token: None,
            kwargs: Default::default(),
            env,
        })
    }

    /// The prompt text for `messages`, with the assistant's generation prompt when
    /// `add_generation_prompt`. A template that raises (`raise_exception`, say for roles that do
    /// not alternate) or fails is an [`Error::Invalid`] on `chat_template` with its message.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template(NAME).map_err(|e| Error::invalid("chat_template", describe(&e)))?;
        let ctx = minijinja::context! {
            messages => messages
                .iter()
                .map(|m| minijinja::context! { role => m.role.clone(), content => m.content.clone() })
                .collect::<Vec<_>>(),
            add_generation_prompt => add_generation_prompt,
            tools => (),
            documents => (),
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
            pad_token => self.pad_token.clone(),
            ..json_value(&serde_json::Value::Object(self.kwargs.clone()))
        };
        t.render(ctx).map_err(|e| Error::invalid("chat_template", describe(&e)))
    }
}

/// A JSON value as the template's value (objects keep their key order).
fn json_value(v: &serde_json::Value) -> minijinja::Value {
    use serde_json::Value as J;
    match v {
        J::Null => minijinja::Value::from(()),
        J::Bool(b) => minijinja::Value::from(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => minijinja::Value::from(i),
            (_, Some(u), _) => minijinja::Value::from(u),
            (_, _, f) => minijinja::Value::from(f.unwrap_or(f64::NAN)),
        },
        J::String(s) => minijinja::Value::from(s.as_str()),
        J::Array(a) => a.iter().map(json_value).collect(),
        J::Object(o) => minijinja::Value::from_pairs(o.iter().map(|(k, v)| (k.as_str(), json_value(v)))),
    }
}

/// A minijinja error with its causes, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// `tojson`, as transformers defines it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=indent)` (`", "` and `": "` separators without an indent; keys in their order).
fn tojson(
    v: minijinja::Value,
    indent: Option<usize>,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let indent = match kwargs.get::<Option<usize>>("indent")? {
        Some(i) => Some(i),
        None => indent,
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    py_dumps(&v, indent, 0, &mut out)?;
    Ok(minijinja::Value::from_safe_string(out))
}

fn py_dumps(v: &minijinja::Value, indent: Option<usize>, depth: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind as K;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    let bad = |what: &str| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("tojson: cannot serialize {what}"));
    match v.kind() {
        K::Undefined | K::None => out.push_str("null"),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        // Integers as Python prints them; floats with Python's repr (1.0, not 1).
        K::Number => match (i64::try_from(v.clone()), f64::try_from(v.clone())) {
            (Ok(i), _) if !v.to_string().contains(['.', 'e', 'E']) => out.push_str(&i.to_string()),
            (_, Ok(f)) if f.is_finite() => out.push_str(&format!("{f:?}")),
            (_, Ok(f)) => out.push_str(if f.is_nan() { "NaN" } else if f > 0.0 { "Infinity" } else { "-Infinity" }),
            _ => return Err(bad("a number")),
        },
        K::String => out.push_str(&serde_json::Value::String(v.as_str().unwrap_or_default().to_string()).to_string()),
        K::Seq | K::Iterable => {
            let items: Vec<minijinja::Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                py_dumps(x, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        K::Map => {
            let keys: Vec<minijinja::Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                let name = k.as_str().map(str::to_string).unwrap_or_else(|| k.to_string());
                out.push_str(&serde_json::Value::String(name).to_string());
                out.push_str(": ");
                py_dumps(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => return Err(bad(&format!("{:?}", v.kind()))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_template_renders_with_its_default_system_prompt() {
        let t = ChatTemplate::smollm2();
        let text = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        // An explicit system message replaces the default one.
        let text = t.render(&[ChatMessage::new("system", "S"), ChatMessage::new("user", "Hi")], false).unwrap();
        assert_eq!(text, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn llama3_template_writes_bos_headers_and_trims() {
        let t = ChatTemplate::from_jinja(LLAMA3_CHAT_TEMPLATE).unwrap().with_special_tokens(
            Some("<|begin_of_text|>".into()),
            Some("<|eot_id|>".into()),
            None,
        );
        let text = t
            .render(&[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "  Hi there \n")], true)
            .unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn transformers_environment_features() {
        // trim_blocks / lstrip_blocks, Python string methods, loop controls.
        let src = "{% for m in messages %}\n  {% if m.role == 'skip' %}{% continue %}{% endif %}\n[{{ m.content.strip().upper() }}]\n{% endfor %}";
        let t = ChatTemplate::from_jinja(src).unwrap();
        let msgs = [ChatMessage::new("user", " a "), ChatMessage::new("skip", "x"), ChatMessage::new("user", "b")];
        assert_eq!(t.render(&msgs, false).unwrap(), "[A]\n[B]\n");
        // raise_exception becomes an error carrying its message.
        let t = ChatTemplate::from_jinja("{{ raise_exception('roles must alternate') }}").unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
        // tojson as Python's json.dumps(ensure_ascii=False).
        let t = ChatTemplate::from_jinja("{{ {'a': [1, 'é'], 'b': none} | tojson }}|{{ [1] | tojson(indent=2) }}").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "{\"a\": [1, \"é\"], \"b\": null}|[\n  1\n]");
        // strftime_now gives today's date.
        let t = ChatTemplate::from_jinja("{{ strftime_now('%Y') }}").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), chrono::Utc::now().format("%Y").to_string());
    }

    #[test]
    fn endless_templates_fail_instead_of_hanging() {
        let t = ChatTemplate::from_jinja(
            "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}",
        )
        .unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("fuel"), "{e}");
        // A long chat with a real template is well within the bound.
        let t = ChatTemplate::from_jinja(LLAMA3_CHAT_TEMPLATE).unwrap().with_special_tokens(
            Some("<|begin_of_text|>".into()),
            None,
            None,
        );
        let chat: Vec<ChatMessage> =
            (0..2000).map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "some words here")).collect();
        t.render(&chat, true).unwrap();
    }

    #[test]
    fn syntax_errors_are_reported() {
        let e = ChatTemplate::from_jinja("{% for m in messages %}{{ m.content }").unwrap_err().to_string();
        assert!(e.contains("chat_template"), "{e}");
    }
}
