//! Training data: JSONL records, turned into token sequences with a loss mask, and batched.
//!
//! One JSON object per line, one of:
//! - `{"tokens": [ids...]}`: the loss is on every next token;
//! - `{"text": "..."}`: tokenized, loss on every next token;
//! - `{"prompt": "...", "completion": "..."}`: `prompt` and `completion` tokenized separately
//!   and concatenated; the loss is on the completion's tokens only;
//! - `{"messages": [{"role": "...", "content": "..."}, ...]}`: a conversation, rendered with the
//!   model's chat template; the loss is on the assistant turns (each with its end-of-turn token)
//!   only ([`Encode::chat`]).
//!
//! Text gets no special tokens but one: BOS first, where the model's tokenizer adds it
//! ([`Encode::bos`]: Llama 3's does, SmolLM2's does not), as `tokenizer(text)` would.
//!
//! Sequences longer than `seq` are cut to their first `seq` tokens. A batch takes `B`
//! consecutive examples (file order, wrapping around at the end; or a seeded shuffle of
//! each pass with `shuffle`), right-pads them to the longest one with unlabelled padding,
//! and its loss is the mean over all its labelled (predicted) tokens.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::llama::Batch;

/// Anything that turns text into token ids (the model's tokenizer).
pub trait Encode {
    /// Token ids of `text`, without special tokens added around it.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// The token a record's text starts with (BOS, where the tokenizer adds one); none by
    /// default.
    fn bos(&self) -> Option<u32> {
        None
    }
    /// A conversation as ids and per-id targets (the assistant turns); by default an error:
    /// only a tokenizer with a chat template can do it.
    fn chat(&self, _messages: &[crate::model::ChatMessage]) -> Result<(Vec<u32>, Vec<bool>)> {
        Err(Error::invalid("messages", "this encoder has no chat template"))
    }
}

impl Encode for crate::model::Tokenizer {
    /// `Tokenizer::encode(text, false)`: no BOS/EOS added.
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        crate::model::Tokenizer::encode(self, text, false)
    }
    /// BOS when the tokenizer adds it ([`crate::model::Tokenizer::adds_bos`]).
    fn bos(&self) -> Option<u32> {
        self.bos_id().filter(|_| self.adds_bos())
    }
    /// [`crate::model::Tokenizer::chat_targets`].
    fn chat(&self, messages: &[crate::model::ChatMessage]) -> Result<(Vec<u32>, Vec<bool>)> {
        self.chat_targets(messages)
    }
}

/// `bos` (if any), then the ids of `text`.
fn encode_first(enc: &dyn Encode, text: &str) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = enc.bos().into_iter().collect();
    ids.extend(enc.encode(text)?);
    Ok(ids)
}

/// One training example: `ids`, and for each position whether *that token* is a target
/// (predicted from the tokens before it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// `target[t]`: the loss includes predicting `ids[t]` from `ids[..t]` (never at `t = 0`).
    pub target: Vec<bool>,
}

impl Example {
    /// The loss on every next token.
    pub fn all(ids: Vec<u32>) -> Example {
        let target = (0..ids.len()).map(|t| t > 0).collect();
        Example { ids, target }
    }
    /// `prompt` then `completion`, the loss on the completion's tokens only.
    pub fn completion(prompt: Vec<u32>, completion: Vec<u32>) -> Example {
        let mut target = vec![false; prompt.len()];
        target.extend(std::iter::repeat(true).take(completion.len()));
        if let Some(t) = target.first_mut() {
            *t = false;
        }
        let mut ids = prompt;
        ids.extend(completion);
        Example { ids, target }
    }
    /// Cut to the first `seq` tokens.
    pub fn truncate(&mut self, seq: usize) {
        self.ids.truncate(seq);
        self.target.truncate(seq);
    }
    /// Number of predicted tokens.
    pub fn count(&self) -> usize {
        self.target.iter().filter(|&&t| t).count()
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    tokens: Option<Vec<u32>>,
    text: Option<String>,
    prompt: Option<String>,
    completion: Option<String>,
    messages: Option<Vec<crate::model::ChatMessage>>,
}

/// Reads a JSONL file of records (see the module docs); `enc` is needed for text records.
/// Every example is cut to `seq` tokens; examples with nothing left to predict are an error
/// naming the line.
pub fn read_jsonl(path: &Path, enc: Option<&dyn Encode>, seq: usize) -> Result<Vec<Example>> {
    if seq < 2 {
        return Err(Error::invalid("seq", format!("needs at least 2 tokens, got {seq}")));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_jsonl(path, &bytes, enc, seq)
}

/// [`read_jsonl`] on the bytes of a file: `path` only names it in errors. Bytes that are not
/// UTF-8 are an error naming the line and byte offset.
pub fn parse_jsonl(path: &Path, bytes: &[u8], enc: Option<&dyn Encode>, seq: usize) -> Result<Vec<Example>> {
    if seq < 2 {
        return Err(Error::invalid("seq", format!("needs at least 2 tokens, got {seq}")));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::format(path, format!("line {line}: not UTF-8 (invalid byte at offset {at})"))
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::format(path, format!("line {line_no}: {msg}"));
        let rec: Record = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let need_enc = || enc.ok_or_else(|| bad("a text record needs a tokenizer".into()));
        let mut ex = match (rec.tokens, rec.text, rec.prompt, rec.completion, rec.messages) {
            (Some(t), None, None, None, None) => Example::all(t),
            (None, Some(s), None, None, None) => Example::all(encode_first(need_enc()?, &s)?),
            (None, None, Some(p), Some(c), None) => {
                let e = need_enc()?;
                Example::completion(encode_first(e, &p)?, e.encode(&c)?)
            }
            (None, None, None, None, Some(m)) => {
                let (ids, target) = need_enc()?.chat(&m).map_err(|e| bad(e.to_string()))?;
                Example { ids, target }
            }
            _ => {
                return Err(bad(
                    "expected exactly one of {\"tokens\"}, {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"}"
                        .into(),
                ))
            }
        };
        ex.truncate(seq);
        if ex.count() == 0 {
            return Err(bad(format!("nothing to predict within the first {seq} tokens")));
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(Error::format(path, "no records"));
    }
    Ok(out)
}

/// Checks that every token id of `examples` (read from `path`) is below `vocab`: an error
/// names the file, the record (counted from 1, blank lines skipped) and the id.
pub fn check_ids(path: &Path, examples: &[Example], vocab: usize) -> Result<()> {
    for (i, e) in examples.iter().enumerate() {
        if let Some(&id) = e.ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::format(
                path,
                format!("record {}: token id {id} is outside the model's vocabulary of {vocab}", i + 1),
            ));
        }
    }
    Ok(())
}

/// A batch of examples, right-padded with `pad` to the longest: `labels[t] = ids[t+1]` where
/// `ids[t+1]` is a target, `-1` elsewhere.
pub fn make_batch(examples: &[&Example], pad: u32) -> Result<Batch> {
    let seq = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if examples.is_empty() || seq == 0 {
        return Err(Error::invalid("batch", "no examples"));
    }
    let mut ids = Vec::with_capacity(examples.len() * seq);
    let mut labels = Vec::with_capacity(examples.len() * seq);
    for e in examples {
        if e.ids.len() != e.target.len() {
            return Err(Error::invalid("example", format!("{} ids but {} target flags", e.ids.len(), e.target.len())));
        }
        for t in 0..seq {
            ids.push(e.ids.get(t).copied().unwrap_or(pad));
            labels.push(match (e.ids.get(t + 1), e.target.get(t + 1)) {
                (Some(&id), Some(true)) => id as i32,
                _ => -1,
            });
        }
    }
    Ok(Batch { batch: examples.len(), seq, ids, labels })
}

/// Batches in file order (wrapping around), or a seeded shuffle of each pass over the data.
#[derive(Clone, Debug)]
pub struct Batcher {
    order: Vec<usize>,
    pos: usize,
    epoch: u64,
    shuffle: Option<u64>,
    batch: usize,
    n: usize,
}

impl Batcher {
    /// `n` examples in batches of `batch`; `shuffle = Some(seed)` reshuffles every pass.
    pub fn new(n: usize, batch: usize, shuffle: Option<u64>) -> Result<Self> {
        if n == 0 {
            return Err(Error::ZeroDim { what: "examples" });
        }
        if batch == 0 {
            return Err(Error::ZeroDim { what: "batch" });
        }
        let mut b = Batcher { order: (0..n).collect(), pos: 0, epoch: 0, shuffle, batch, n };
        b.reorder();
        Ok(b)
    }
    fn reorder(&mut self) {
        self.order = (0..self.n).collect();
        if let Some(seed) = self.shuffle {
            let mut rng =
                crate::train::arithmetic::SplitMix::new(seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for i in (1..self.n).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                self.order.swap(i, j);
            }
        }
    }
    /// Where the next batch starts: `(epoch, position in that epoch's order)`. With
    /// [`Batcher::seek`], all a checkpoint needs (the shuffle of epoch `e` is a function of the
    /// seed and `e`).
    pub fn position(&self) -> (u64, usize) {
        (self.epoch, self.pos)
    }
    /// Continues from a [`Batcher::position`] of a batcher with the same `n`, `batch` and
    /// shuffle seed. `pos` must be at most `n`.
    pub fn seek(&mut self, epoch: u64, pos: usize) -> Result<()> {
        if pos > self.n {
            return Err(Error::invalid("pos", format!("position {pos} is past the {} examples", self.n)));
        }
        self.epoch = epoch;
        self.pos = pos;
        self.reorder();
        Ok(())
    }
    /// Indices of the next batch.
    pub fn next_indices(&mut self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.batch);
        while out.len() < self.batch {
            if self.pos == self.n {
                self.pos = 0;
                self.epoch += 1;
                self.reorder();
            }
            out.push(self.order[self.pos]);
            self.pos += 1;
        }
        out
    }
}
