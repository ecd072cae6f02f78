//! The model's tokenizer: a `tokenizers::Tokenizer` built from GGUF metadata, or read from a
//! `tokenizer.json`.
//!
//! From GGUF (`tokenizer.ggml.model = "gpt2"`, byte-level BPE):
//! * vocabulary `tokenizer.ggml.tokens` (id = position), merges `tokenizer.ggml.merges`
//!   (`"a b"`, in priority order);
//! * pre-tokenizer by `tokenizer.ggml.pre`: for `smollm` (and the other llama.cpp types with the
//!   same rules: `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva`) every
//!   digit `\p{N}` is first split off into its own piece, then the GPT-2 regex
//!   `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` splits the
//!   rest and bytes are mapped to GPT-2's byte alphabet (`ByteLevel`, no prefix space) — the
//!   `Digits(individual_digits) + ByteLevel` pair of SmolLM2's own `tokenizer.json` and
//!   llama.cpp's `smollm` pre-tokenizer. `gpt2`/`gpt-2` use the GPT-2 regex alone.
//!   `llama-bpe` (also `llama3`, `llama-v3`: Meta Llama 3 and later) splits with Llama 3's
//!   regex [`LLAMA3_REGEX`] (case-insensitive contractions, letters with one leading
//!   non-letter, digits in groups of up to three, punctuation runs with their newlines) and
//!   merges with `ignore_merges` (a piece that is a whole vocabulary entry is taken as it is),
//!   as Llama 3's `tokenizer.json` and llama.cpp do; `qwen2` (Qwen2, Qwen2.5, Qwen3; also
//!   `deepseek-r1-qwen`, which llama.cpp treats the same) composes
//!   the text to Unicode NFC first, as their `tokenizer.json` does, then splits with
//!   [`QWEN2_REGEX`] (Llama 3's, but every digit its own piece) and merges without
//!   `ignore_merges`; `tekken` (Mistral's tokenizer since Mistral NeMo: NeMo, Small 3,
//!   Ministral) splits with [`TEKKEN_REGEX`] (words cut where the case changes, single digits,
//!   punctuation runs with their newlines and slashes) and merges with `ignore_merges`, as the
//!   `tokenizer.json` transformers makes from Mistral's `tekken.json` does;
//!
//! From GGUF with `tokenizer.ggml.model = "llama"` (SentencePiece BPE: Llama 1/2, TinyLlama,
//! Mistral 7B v0.1, CodeLlama): pieces, `tokenizer.ggml.scores` and types become a BPE with
//! byte fallback, as transformers' `LlamaConverter` builds it (see `sentencepiece_bpe`); it
//! encodes as the `sentencepiece` library does (tests/spm_tokenizer.rs).
//!
//! For both:
//! * `token_type == 3` (control) tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, ...)
//!   are special added tokens: matched whole in the input before BPE, skipped by
//!   `decode(.., skip_special = true)`; `token_type == 4` (user-defined) are non-special added
//!   tokens;
//! * BOS is prepended by [`Tokenizer::encode`] with `add_special = true` only when
//!   `tokenizer.ggml.add_bos_token` is true (false for SmolLM2). EOS is
//!   `tokenizer.ggml.eos_token_id`.
//!
//! Built with `tokenizers` `default-features = false, features = ["fancy-regex"]`: pure Rust,
//! no oniguruma C library.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::chat::{ChatMessage, ChatTemplate};
use super::weights::gguf::GgufFile;
use crate::error::{Error, Result};

/// llama.cpp pre-tokenizer types that split every digit off before the GPT-2 regex.
const DIGIT_SPLIT_PRE: [&str; 7] =
    ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"];

/// llama.cpp pre-tokenizer types of Meta Llama 3's tokenizer.
const LLAMA3_PRE: [&str; 3] = ["llama-bpe", "llama3", "llama-v3"];

/// The pre-tokenizer regex of Meta Llama 3's `tokenizer.json` (llama.cpp's `LLAMA3` type).
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp pre-tokenizer types of Qwen2's tokenizer (DeepSeek-R1's Qwen distills keep Qwen's
/// vocabulary and rules).
const QWEN2_PRE: [&str; 2] = ["qwen2", "deepseek-r1-qwen"];

/// The pre-tokenizer regex of Qwen2's `tokenizer.json` (llama.cpp's `QWEN2` type): Llama 3's
/// with single digits.
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp pre-tokenizer type of Mistral's tekken tokenizer.
const TEKKEN_PRE: &str = "tekken";

/// The pre-tokenizer regex of Mistral's tekken tokenizer (`config.pattern` of its
/// `tekken.json`): a word is an optional non-letter, then upper- or title-case letters, then
/// lower-case ones (or upper-case letters alone), so `HTTPServer` splits before `Server`.
pub const TEKKEN_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// End-of-turn and end-of-text tokens taken as EOS, in this order, when a `tokenizer.json`
/// comes without a `tokenizer_config.json` naming its `eos_token`: ChatML's, Llama 3's, GPT-2's.
pub const EOS_FALLBACKS: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"];

/// How a GGUF's `tokenizer.ggml.pre` splits text before BPE.
#[derive(Clone, Copy, PartialEq)]
enum Pre {
    Gpt2,
    DigitsThenGpt2,
    Llama3,
    Qwen2,
    Tekken,
}

/// A text tokenizer with the model's special ids and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
    bos_id: Option<u32>,
    eos_id: u32,
    pad_id: Option<u32>,
    add_bos: bool,
    /// `encode(.., add_special = true)` starts with BOS (by `add_bos`, or by a
    /// `tokenizer.json`'s post-processor).
    bos_first: bool,
    vocab_size: usize,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from the metadata of the GGUF file at `path`.
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_gguf_file(&GgufFile::open(path)?)
    }

    /// Builds the tokenizer from an opened GGUF file (see the module docs).
    pub fn from_gguf_file(g: &GgufFile) -> Result<Self> {
        let model = g.get_str("tokenizer.ggml.model")?;
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        let types = match g.get("tokenizer.ggml.token_type") {
            Some(_) => g.get_i64_array("tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(g.error(format!(
                "tokenizer.ggml.token_type has {} entries, tokenizer.ggml.tokens {}",
                types.len(),
                tokens.len()
            )));
        }
        let n = tokens.len();
        let mut vocab = tokenizers::models::bpe::Vocab::default();
        vocab.reserve(n);
        for (i, t) in tokens.iter().enumerate() {
            if vocab.insert(t.to_string(), i as u32).is_some() {
                return Err(g.error(format!("tokenizer.ggml.tokens: token {t:?} appears twice")));
            }
        }
        let mut inner = match model {
            "gpt2" => byte_level_bpe(g, vocab)?,
            "llama" => sentencepiece_bpe(g, vocab, &tokens, &types)?,
            other => {
                return Err(g.error(format!(
                    "tokenizer.ggml.model {other:?} is not supported (supported: \"gpt2\", byte-level BPE; \"llama\", SentencePiece BPE)"
                )))
            }
        };
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == 3)
            .map(|(t, _)| AddedToken::from(t.to_string(), true).normalized(false))
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == 4)
            .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
            .collect();
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);

        let id = |key: &str| -> Result<Option<u32>> {
            match g.get(key) {
                None => Ok(None),
                Some(_) => {
                    let v = g.get_usize(key)?;
                    if v >= n {
                        return Err(g.error(format!("{key} = {v} is outside the vocabulary of {n}")));
                    }
                    Ok(Some(v as u32))
                }
            }
        };
        let bos_id = id("tokenizer.ggml.bos_token_id")?;
        let eos_id = id("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| g.error("missing metadata key \"tokenizer.ggml.eos_token_id\""))?;
        let pad_id = id("tokenizer.ggml.padding_token_id")?;
        let add_bos = match g.get("tokenizer.ggml.add_bos_token") {
            Some(_) => g.get_bool("tokenizer.ggml.add_bos_token")?,
            None => false,
        };
        if add_bos && bos_id.is_none() {
            return Err(g.error("tokenizer.ggml.add_bos_token is true but there is no bos_token_id"));
        }
        let chat_template = match g.get("tokenizer.chat_template") {
            None => None,
            Some(_) => Some(
                ChatTemplate::parse(g.get_str("tokenizer.chat_template")?)
                    .map_err(|m| g.error(format!("tokenizer.chat_template: {m}")))?
                    .with_special_tokens(
                        bos_id.map(|i| tokens[i as usize].to_string()),
                        Some(tokens[eos_id as usize].to_string()),
                        pad_id.map(|i| tokens[i as usize].to_string()),
                    ),
            ),
        };
        Ok(Tokenizer {
            inner,
            source: g.path().to_path_buf(),
            bos_id,
            eos_id,
            pad_id,
            add_bos,
            bos_first: add_bos,
            vocab_size: n,
            chat_template,
        })
    }

    /// Reads a Hugging Face `tokenizer.json`. The EOS token, BOS token and chat template come
    /// from `tokenizer_config.json` beside it (`eos_token`, `bos_token`, `chat_template`);
    /// without it, EOS is the first of [`EOS_FALLBACKS`] the vocabulary has.
    /// BOS/EOS insertion is left to the file's own post-processor; where that adds no BOS and
    /// `add_bos_token` is true, [`Tokenizer::encode`] puts BOS first itself.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| Error::format(path, format!("invalid tokenizer.json: {e}")))?;
        let cfg_path = path.with_file_name("tokenizer_config.json");
        let cfg: Option<serde_json::Value> = if cfg_path.exists() {
            let t = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            Some(
                serde_json::from_str(&t)
                    .map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?,
            )
        } else {
            None
        };
        let token_of = |key: &str| -> Option<String> {
            let v = cfg.as_ref()?.get(key)?;
            v.as_str().map(str::to_string).or_else(|| v.get("content")?.as_str().map(str::to_string))
        };
        let lookup = |tok: &str, key: &str| -> Result<u32> {
            inner
                .token_to_id(tok)
                .ok_or_else(|| Error::format(&cfg_path, format!("{key} {tok:?} is not in the vocabulary")))
        };
        let eos_id = match token_of("eos_token") {
            Some(t) => lookup(&t, "eos_token")?,
            None => EOS_FALLBACKS.iter().find_map(|t| inner.token_to_id(t)).ok_or_else(|| {
                Error::format(path, format!("no tokenizer_config.json eos_token and none of {EOS_FALLBACKS:?}"))
            })?,
        };
        let bos_id = match token_of("bos_token") {
            Some(t) => Some(lookup(&t, "bos_token")?),
            None => None,
        };
        let pad_id = match token_of("pad_token") {
            Some(t) => Some(lookup(&t, "pad_token")?),
            None => None,
        };
        let chat_template = match cfg.as_ref().and_then(|c| c.get("chat_template")).and_then(|v| v.as_str()) {
            Some(src) => Some(
                ChatTemplate::parse(src)
                    .map_err(|m| Error::format(&cfg_path, format!("chat_template: {m}")))?
                    .with_special_tokens(
                        bos_id.and_then(|i| inner.id_to_token(i)),
                        inner.id_to_token(eos_id),
                        pad_id.and_then(|i| inner.id_to_token(i)),
                    ),
            ),
            None => None,
        };
        let vocab_size = inner.get_vocab_size(true);
        // BOS comes from the file's post-processor (Llama 3's tokenizer.json) or, where that
        // adds none, from tokenizer_config.json's add_bos_token.
        let by_post = bos_id.is_some_and(|b| {
            inner.encode("a", true).is_ok_and(|e| e.get_ids().first() == Some(&b))
                && inner.encode("a", false).is_ok_and(|e| e.get_ids().first() != Some(&b))
        });
        let add_bos = !by_post
            && bos_id.is_some()
            && cfg.as_ref().and_then(|c| c.get("add_bos_token")).and_then(|v| v.as_bool()) == Some(true);
        let bos_first = by_post || add_bos;
        Ok(Tokenizer {
            inner,
            source: path.to_path_buf(),
            bos_id,
            eos_id,
            pad_id,
            add_bos,
            bos_first,
            vocab_size,
            chat_template,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their
    /// ids. With `add_special`, BOS is prepended when the model asks for it
    /// (`tokenizer.ggml.add_bos_token`; never for SmolLM2) or, for a `tokenizer.json`, its
    /// post-processor runs.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| Error::invalid("text", format!("tokenizing failed: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The text of `ids`; special tokens are left out when `skip_special`. Every id must be
    /// below [`Tokenizer::vocab_size`].
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some((i, &bad)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= self.vocab_size) {
            return Err(Error::invalid(
                "ids",
                format!("ids[{i}] = {bad} is outside the vocabulary of {}", self.vocab_size),
            ));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::invalid("ids", format!("decoding failed: {e}")))
    }

    /// The end-of-sequence id (`<|im_end|>`, 2, for SmolLM2-Instruct).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The token that ends an assistant turn in the chat format: ChatML's `<|im_end|>`,
    /// Llama 3's `<|eot_id|>`, or Phi's `<|end|>` when the vocabulary has one as a special
    /// token, else [`Tokenizer::eos_id`]. Answers trained in the chat format end with it, and
    /// generation stops at it.
    pub fn end_of_turn_id(&self) -> u32 {
        ["<|im_end|>", "<|eot_id|>", "<|end|>"]
            .iter()
            .filter_map(|t| self.inner.token_to_id(t))
            .find(|&id| self.inner.get_added_vocabulary().is_special_token(&self.inner.id_to_token(id).unwrap_or_default()))
            .unwrap_or(self.eos_id)
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether [`Tokenizer::encode`] with `add_special` puts BOS first (GGUF
    /// `tokenizer.ggml.add_bos_token`, or a `tokenizer.json`'s post-processor: true for
    /// Llama 3, false for SmolLM2).
    pub fn adds_bos(&self) -> bool {
        self.bos_first
    }

    /// The padding id, if the model names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Number of ids (base vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of token string `token` (`"<|im_end|>"`), if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of `id`, if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The tokenizer with extra variables for its chat template ([`ChatTemplate::with_kwargs`],
    /// e.g. Qwen3's `{"enable_thinking": false}`). A tokenizer without a chat template is an
    /// error naming its file.
    pub fn with_chat_template_kwargs(mut self, kwargs: serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        let t = self
            .chat_template
            .take()
            .ok_or_else(|| Error::format(&self.source, "the tokenizer has no chat template to pass chat_template_kwargs to"))?;
        self.chat_template = Some(t.with_kwargs(kwargs)?);
        Ok(self)
    }

    /// The underlying `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The chat prompt text of `messages` (see [`ChatTemplate::render`]).
    pub fn chat_text(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let t = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::format(&self.source, "the tokenizer has no chat template"))?;
        t.render(messages, add_generation_prompt)
    }

    /// Ids of `messages` rendered with the chat template, tokenized as one text without BOS
    /// (as `apply_chat_template(messages, add_generation_prompt, tokenize=True)`).
    pub fn chat_ids(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode(&self.chat_text(messages, add_generation_prompt)?, false)
    }

    /// A whole conversation for training: the ids of `messages` rendered with the chat
    /// template (as [`Tokenizer::chat_ids`] without a generation prompt), and for each id
    /// whether it is part of an assistant turn, the turn's end-of-turn token included (what
    /// follows that token, a newline say, is not). An assistant turn is the text the template
    /// adds between the conversation up to it with the generation prompt and the conversation
    /// through it. A template may render a turn differently once the conversation goes on
    /// (Qwen3's drops the thinking of the turns before the last user message): the turn is then
    /// taken as it stands in the whole conversation, from the end of the generation prompt
    /// through its first end-of-turn token. A template whose conversation up to a turn, with
    /// the generation prompt, is not a prefix of the whole is an error naming the message. At
    /// least one message must be the assistant's.
    pub fn chat_targets(&self, messages: &[ChatMessage]) -> Result<(Vec<u32>, Vec<bool>)> {
        let full = self.chat_text(messages, false)?;
        let eot_text = self.id_to_token(self.end_of_turn_id()).unwrap_or_default();
        let mut spans = Vec::new();
        for (i, _) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            let unfound = |why: &str| {
                Error::invalid("messages", format!("the assistant turn of message {i} cannot be found: {why}"))
            };
            let before = self.chat_text(&messages[..i], true)?;
            if !full.starts_with(&before) {
                return Err(unfound(
                    "the chat template does not render the conversation before it, with the generation prompt, as a prefix of the whole",
                ));
            }
            let through = self.chat_text(&messages[..=i], false)?;
            let end = if through.starts_with(&before) && full.starts_with(&through) {
                through.len()
            } else {
                // Rendered otherwise inside the longer conversation: the turn as it stands there.
                let rest = &full[before.len()..];
                match rest.find(eot_text.as_str()).filter(|_| !eot_text.is_empty()) {
                    Some(p) => before.len() + p + eot_text.len(),
                    None => return Err(unfound(&format!("it is rendered differently inside the whole conversation, and no {eot_text:?} ends it there"))),
                }
            };
            spans.push(before.len()..end);
        }
        if spans.is_empty() {
            return Err(Error::invalid("messages", "no assistant message: nothing to train on"));
        }
        let enc = self
            .inner
            .encode(full.as_str(), false)
            .map_err(|e| Error::invalid("messages", format!("tokenizing failed: {e}")))?;
        let ids = enc.get_ids().to_vec();
        let mut target = vec![false; ids.len()];
        let eot = self.end_of_turn_id();
        for span in &spans {
            let inside: Vec<usize> =
                (0..ids.len()).filter(|&t| span.contains(&enc.get_offsets()[t].0)).collect();
            let last = inside.iter().rev().find(|&&t| ids[t] == eot).copied().or(inside.last().copied());
            for &t in inside.iter().filter(|&&t| Some(t) <= last) {
                target[t] = true;
            }
        }
        if let Some(t) = target.first_mut() {
            *t = false;
        }
        Ok((ids, target))
    }

    /// Ids of a one-turn instruct prompt: the default system message, `user`, and the
    /// assistant generation prompt. For SmolLM2:
    /// `<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging
    /// Face<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n`.
    pub fn chat_prompt(&self, user: &str) -> Result<Vec<u32>> {
        self.chat_ids(&[ChatMessage::new("user", user)], true)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (bos/eos/pad tokens, chat
    /// template) into `dir`, atomically, so that [`Tokenizer::from_file`] and `transformers`
    /// read the same tokenizer back.
    pub fn save_hf(&self, dir: impl AsRef<Path>) -> Result<()> {
        use std::io::Write;
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // A BOS the model adds is written as the file's post-processor (as Llama 3's own
        // tokenizer.json has it), so that transformers and `from_file` add it too.
        let mut inner = self.inner.clone();
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            let name = self.inner.id_to_token(bos).unwrap_or_default();
            let template = tokenizers::processors::template::TemplateProcessing::builder()
                .try_single(format!("{name}:0 $A:0"))
                .and_then(|b| b.try_pair(format!("{name}:0 $A:0 {name}:1 $B:1")))
                .map_err(|e| Error::invalid("tokenizer", format!("BOS template: {e}")))?
                .special_tokens(vec![(name, bos)])
                .build()
                .map_err(|e| Error::invalid("tokenizer", format!("BOS template: {e}")))?;
            inner.with_post_processor(Some(template));
        }
        let json = inner.to_string(false).map_err(|e| Error::invalid("tokenizer", format!("serializing: {e}")))?;
        super::weights::write_atomic(&dir.join("tokenizer.json"), |f| f.write_all(json.as_bytes()))?;
        let name = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let cfg = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id),
            "eos_token": name(Some(self.eos_id)),
            "pad_token": name(self.pad_id),
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template.as_ref().map(|t| t.source.clone()),
        });
        let text =
            serde_json::to_string_pretty(&cfg).map_err(|e| Error::invalid("tokenizer", e.to_string()))?;
        super::weights::write_atomic(&dir.join("tokenizer_config.json"), |f| f.write_all(text.as_bytes()))
    }
}

/// A byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the pre-tokenizer
/// `tokenizer.ggml.pre` names and the merges `tokenizer.ggml.merges` lists.
fn byte_level_bpe(g: &GgufFile, vocab: tokenizers::models::bpe::Vocab) -> Result<tokenizers::Tokenizer> {
    let pre = match g.get("tokenizer.ggml.pre") {
        Some(_) => g.get_str("tokenizer.ggml.pre")?,
        None => "gpt2",
    };
    let pre = if DIGIT_SPLIT_PRE.contains(&pre) {
        Pre::DigitsThenGpt2
    } else if LLAMA3_PRE.contains(&pre) {
        Pre::Llama3
    } else if QWEN2_PRE.contains(&pre) {
        Pre::Qwen2
    } else if pre == TEKKEN_PRE {
        Pre::Tekken
    } else if pre == "gpt2" || pre == "gpt-2" {
        Pre::Gpt2
    } else {
        return Err(g.error(format!(
            "tokenizer.ggml.pre {pre:?} is not supported (supported: {DIGIT_SPLIT_PRE:?}, {LLAMA3_PRE:?}, {QWEN2_PRE:?}, {TEKKEN_PRE:?}, gpt2)"
        )));
    };
    let merges_raw = g.get_str_array("tokenizer.ggml.merges")?;
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let (a, b) = m
            .split_once(' ')
            .filter(|(a, b)| vocab.contains_key(*a) && vocab.contains_key(*b) && !b.contains(' '))
            .ok_or_else(|| g.error(format!("tokenizer.ggml.merges[{i}] = {m:?} is not two vocabulary tokens")))?;
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(false)
        .ignore_merges(matches!(pre, Pre::Llama3 | Pre::Tekken))
        .build()
        .map_err(|e| g.error(format!("building the BPE model: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre_tok: PreTokenizerWrapper = match pre {
        Pre::Gpt2 => ByteLevel::new(false, true, true).into(),
        Pre::DigitsThenGpt2 => {
            Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()
        }
        Pre::Llama3 | Pre::Qwen2 | Pre::Tekken => {
            let regex = match pre {
                Pre::Llama3 => LLAMA3_REGEX,
                Pre::Qwen2 => QWEN2_REGEX,
                _ => TEKKEN_REGEX,
            };
            let split = Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| g.error(format!("the pre-tokenizer regex: {e}")))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
    };
    if pre == Pre::Qwen2 {
        inner.with_normalizer(Some(tokenizers::normalizers::unicode::NFC));
    }
    inner.with_pre_tokenizer(Some(pre_tok));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(inner)
}

/// A SentencePiece BPE (`tokenizer.ggml.model = "llama"`: Llama 1/2, TinyLlama, Mistral 7B
/// v0.1, CodeLlama), as transformers' `LlamaConverter` turns `tokenizer.model` into a
/// `tokenizers` BPE: merges made from the vocabulary (every split of a normal piece into two
/// pieces, the piece's `tokenizer.ggml.scores` deciding the order, highest first; ties by piece
/// id, then by the pair's ids), byte fallback to the `<0xXX>` pieces, unknown pieces fused
/// into one `<unk>`; spaces become `▁` and, with `tokenizer.ggml.add_space_prefix` (default
/// true), one `▁` goes first; decoding reverses both. That is SentencePiece's own BPE
/// encoding: repeatedly join the adjacent pair whose join is the highest-scoring piece.
fn sentencepiece_bpe(
    g: &GgufFile,
    vocab: tokenizers::models::bpe::Vocab,
    tokens: &[&str],
    types: &[i64],
) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as Decoders, strip::Strip};
    use tokenizers::normalizers::{prepend::Prepend, replace::Replace, NormalizerWrapper, Sequence as Normalizers};
    let scores = g.get_f64_array("tokenizer.ggml.scores")?;
    if scores.len() != tokens.len() {
        return Err(g.error(format!(
            "tokenizer.ggml.scores has {} entries, tokenizer.ggml.tokens {}",
            scores.len(),
            tokens.len()
        )));
    }
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(g.error(format!("tokenizer.ggml.scores[{i}] is NaN")));
    }
    let add_space_prefix = match g.get("tokenizer.ggml.add_space_prefix") {
        Some(_) => g.get_bool("tokenizer.ggml.add_space_prefix")?,
        None => true,
    };
    // (score, piece id, left id, right id) of every split of a normal piece into two pieces.
    let mut merges: Vec<(f64, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != 1 {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&piece[..at]), vocab.get(&piece[at..])) {
                merges.push((scores[id], id as u32, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
    let merges: Vec<(String, String)> =
        merges.iter().map(|&(_, _, l, r)| (tokens[l as usize].to_string(), tokens[r as usize].to_string())).collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = types.iter().position(|&t| t == 2) {
        builder = builder.unk_token(tokens[unk].to_string());
    }
    let bpe = builder.build().map_err(|e| g.error(format!("building the SentencePiece BPE model: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let bad = |e: tokenizers::Error| g.error(format!("building the SentencePiece normalizer: {e}"));
    let replace: NormalizerWrapper = Replace::new(" ", "\u{2581}").map_err(bad)?.into();
    let normalizer: NormalizerWrapper = if add_space_prefix {
        Normalizers::new(vec![Prepend::new("\u{2581}".into()).into(), replace]).into()
    } else {
        replace
    };
    inner.with_normalizer(Some(normalizer));
    let mut decoders = vec![
        Replace::new("\u{2581}", " ").map_err(bad)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(Decoders::new(decoders)));
    Ok(inner)
}
