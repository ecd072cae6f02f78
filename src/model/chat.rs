//! Chat prompts in the ChatML format of SmolLM2-Instruct.
//!
//! The model's template (GGUF `tokenizer.chat_template`, a Jinja string) is:
//!
//! ```text
//! {% for message in messages %}
//!   {% if loop.first and messages[0]['role'] != 'system' %}
//!     {{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}
//!   {% endif %}
//!   {{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
//! {% endfor %}
//! {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
//! ```
//!
//! Rather than embed a Jinja engine, [`ChatTemplate::from_jinja`] recognises ChatML templates
//! of this shape (and extracts the default system prompt, if any) and rejects any other
//! template with an error; [`ChatTemplate::render`] produces the same text the Jinja template
//! does. The text is then tokenized as a whole with special tokens parsed and no BOS, as
//! `transformers`' `apply_chat_template(..., tokenize=True)` does.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The default system prompt of SmolLM2-Instruct's template.
pub const SMOLLM2_SYSTEM_PROMPT: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// The Jinja chat template shipped with SmolLM2-Instruct (as in its GGUF metadata).
pub const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

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

/// A ChatML chat template: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, a default
/// system message first when the conversation has none, and `<|im_start|>assistant\n` as the
/// generation prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTemplate {
    /// The system prompt inserted when the first message is not a system message.
    pub default_system: Option<String>,
    /// The Jinja source this was recognised from.
    pub source: String,
}

impl ChatTemplate {
    /// SmolLM2-Instruct's template.
    pub fn smollm2() -> Self {
        ChatTemplate {
            default_system: Some(SMOLLM2_SYSTEM_PROMPT.to_string()),
            source: SMOLLM2_CHAT_TEMPLATE.into(),
        }
    }

    /// Recognises a ChatML Jinja template (`<|im_start|>` + role + newline + content +
    /// `<|im_end|>` + newline per message). A default system prompt is taken from a literal
    /// `<|im_start|>system\n...<|im_end|>` guarded by `messages[0]['role'] != 'system'`.
    /// Any other template is an [`Error::Invalid`] on `chat_template` saying why.
    pub fn from_jinja(src: &str) -> Result<Self> {
        Self::parse(src).map_err(|m| Error::invalid("chat_template", m))
    }

    /// [`ChatTemplate::from_jinja`] with the error as a bare message.
    pub(crate) fn parse(src: &str) -> std::result::Result<Self, String> {
        // Jinja string literals may hold real newlines or `\n` escapes; compare on the latter.
        let norm = src.replace('\n', "\\n").replace('"', "'");
        let compact: String = norm.chars().filter(|c| !c.is_whitespace()).collect();
        let is_chatml = compact
            .contains("'<|im_start|>'+message['role']+'\\n'+message['content']+'<|im_end|>'+'\\n'")
            && compact.contains("{%ifadd_generation_prompt%}{{'<|im_start|>assistant\\n'}}{%endif%}");
        if !is_chatml {
            return Err(format!(
                "unsupported chat template (only ChatML templates like SmolLM2's are understood): {}",
                src.chars().take(200).collect::<String>()
            ));
        }
        let default_system = if compact.contains("messages[0]['role']!='system'") {
            let key = "'<|im_start|>system\\n";
            let start =
                norm.find(key).ok_or("the template checks for a system message but has no default one")?;
            let rest = &norm[start + key.len()..];
            let end = rest.find("<|im_end|>").ok_or("the default system message has no <|im_end|>")?;
            Some(rest[..end].replace("\\n", "\n").replace("\\'", "'"))
        } else {
            None
        };
        Ok(ChatTemplate { default_system, source: src.to_string() })
    }

    /// The prompt text for `messages`, ending with `<|im_start|>assistant\n` when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        let mut s = String::new();
        if let (Some(first), Some(sys)) = (messages.first(), &self.default_system) {
            if first.role != "system" {
                s.push_str("<|im_start|>system\n");
                s.push_str(sys);
                s.push_str("<|im_end|>\n");
            }
        }
        for m in messages {
            s.push_str("<|im_start|>");
            s.push_str(&m.role);
            s.push('\n');
            s.push_str(&m.content);
            s.push_str("<|im_end|>\n");
        }
        if add_generation_prompt {
            s.push_str("<|im_start|>assistant\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_template_is_recognised_with_its_system_prompt() {
        let t = ChatTemplate::from_jinja(SMOLLM2_CHAT_TEMPLATE).unwrap();
        assert_eq!(t.default_system.as_deref(), Some(SMOLLM2_SYSTEM_PROMPT));
        let text = t.render(&[ChatMessage::new("user", "Hi")], true);
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        // An explicit system message replaces the default one.
        let text = t.render(&[ChatMessage::new("system", "S"), ChatMessage::new("user", "Hi")], false);
        assert_eq!(text, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn escaped_newlines_and_no_default_system() {
        let src = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let t = ChatTemplate::from_jinja(src).unwrap();
        assert_eq!(t.default_system, None);
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], true),
            "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn other_templates_are_rejected() {
        assert!(ChatTemplate::from_jinja(
            "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
        )
        .is_err());
    }
}
