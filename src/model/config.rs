//! The Llama hyper-parameters, read from GGUF metadata (`llama.*`, `qwen2.*` or `qwen3.*` keys)
//! or from a Hugging Face `config.json`, and written back as a `config.json`.
//!
//! The model these describe (HF `LlamaForCausalLM`): `embed_tokens` (vocab x hidden), then
//! `num_hidden_layers` blocks of
//! `h = x + o_proj(attn(rope(q_proj(rms(x))), rope(k_proj(rms(x))), v_proj(rms(x))))`,
//! `x' = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))`, a final RMSNorm
//! (`rms(x) = x / sqrt(mean(x^2) + rms_norm_eps) * w`) and `lm_head` (= `embed_tokens` when
//! `tie_word_embeddings`). Attention has `num_attention_heads` query heads and
//! `num_key_value_heads` key/value heads (GQA) of `head_dim`; RoPE rotates `(x[i], x[i+head_dim/2])`
//! by the angle `pos * rope_theta^(-2i/head_dim)`, with the frequencies scaled as `rope_scaling`
//! says ([`crate::rope`]: linear, Llama 3.1's `llama3`, or a GGUF's `rope_freqs` factors).
//!
//! Two families built on the same block are read too ([`Arch`]): Qwen2 (Qwen2.5), whose q, k
//! and v projections have biases, and Qwen3, which applies an RMSNorm of `head_dim` to every
//! query and key head before RoPE (`q_norm`, `k_norm`). Llama's own `attention_bias` (q, k, v,
//! o) and `mlp_bias` (gate, up, down) are supported as well. Biases and norms are frozen: the
//! adapter edits `W` only, `y = x (W + s W phi psi)^T + b`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::weights::gguf::GgufFile;
use crate::error::{Error, Result};
use crate::rope::{Rope, RopeScaling};

/// The model family: Llama's block, and what Qwen2 and Qwen3 add to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama (also Mistral, whose sliding window is [`LlamaConfig::sliding_window`]): biases
    /// only where `attention_bias` / `mlp_bias` say.
    #[default]
    Llama,
    /// Qwen2 and Qwen2.5: biases on q, k and v, none elsewhere.
    Qwen2,
    /// Qwen3: RMSNorm over each query and key head (`q_norm`, `k_norm`) before RoPE; biases on
    /// q, k, v and o only with `attention_bias`.
    Qwen3,
    /// SmolLM3: Llama's block, with no RoPE in some layers ([`LlamaConfig::nope_layers`]: every
    /// 4th).
    #[serde(rename = "smollm3")]
    SmolLM3,
    /// IBM Granite (3.x): Llama's block with four scalars ([`LlamaConfig::multipliers`]).
    Granite,
}

/// Granite's scalars (transformers' `GraniteConfig`; GGUF `granite.embedding_scale`,
/// `granite.residual_scale`, `granite.attention.scale`, `granite.logit_scale`): the input
/// embeddings are multiplied by `embedding`, each attention and MLP output by `residual` before
/// its residual add, the attention scores by `attention` (instead of `1 / sqrt(head_dim)`), and
/// the logits divided by `logits_scaling`. The model folds them into its frozen weights
/// ([`crate::model::llama::HostWeights::from_llama`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Multipliers {
    pub embedding: f32,
    pub residual: f32,
    pub attention: f32,
    pub logits_scaling: f32,
}

impl Arch {
    /// The name of the architecture in GGUF metadata (`general.architecture`) and the prefix of
    /// its keys.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::SmolLM3 => "smollm3",
            Arch::Granite => "granite",
        }
    }
}

/// Llama hyper-parameters, with Hugging Face `config.json` field names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// The model family (Llama unless said).
    #[serde(default)]
    pub arch: Arch,
    /// Number of tokens in the vocabulary (rows of `embed_tokens`).
    pub vocab_size: usize,
    /// Model width `d`.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (divides `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// Width of one head (`hidden_size / num_attention_heads` unless given).
    pub head_dim: usize,
    /// RoPE base `theta`.
    pub rope_theta: f32,
    /// RoPE's frequency scaling (HF `rope_scaling`; GGUF `rope.scaling.*` or `rope_freqs.weight`).
    #[serde(default)]
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` is `embed_tokens` (no separate output matrix).
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id, if the model has one.
    pub eos_token_id: Option<u32>,
    /// Biases on q, k, v and o (Llama, Qwen3; Qwen2 has them on q, k, v regardless).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on gate, up and down (Llama).
    #[serde(default)]
    pub mlp_bias: bool,
    /// A sliding attention window shorter than the context (Mistral 7B v0.1's 4096; Qwen2,
    /// Qwen3 and SmolLM3 with `use_sliding_window`): query `i` attends to keys `j` with
    /// `i - window < j <= i` only, in every layer but [`LlamaConfig::full_attention_layers`].
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// The layers (0-based, ascending) that keep full causal attention despite
    /// `sliding_window` (Qwen's below `max_window_layers`, HF `layer_types`' `full_attention`
    /// ones); empty when the window applies in every layer, as in Mistral.
    #[serde(default)]
    pub full_attention_layers: Vec<usize>,
    /// The layers (0-based, ascending) that apply no RoPE to q and k (SmolLM3's "NoPE" layers:
    /// every 4th); empty for every other family.
    #[serde(default)]
    pub nope_layers: Vec<usize>,
    /// Granite's scalars; `None` for every other family.
    #[serde(default)]
    pub multipliers: Option<Multipliers>,
}

/// The subset of an HF `config.json` this crate reads.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    /// Mistral's sliding attention window (`null`: full causal attention, as Llama).
    sliding_window: Option<serde_json::Value>,
    /// Qwen2/Qwen3/SmolLM3: whether `sliding_window` applies at all.
    use_sliding_window: Option<bool>,
    /// Qwen2/Qwen3 without `layer_types`: layers from this one on use the sliding window.
    max_window_layers: Option<usize>,
    /// transformers 5: each layer's attention kind (`full_attention`, `sliding_attention`).
    layer_types: Option<Vec<String>>,
    /// SmolLM3: per layer, 1 if it applies RoPE, 0 if not.
    no_rope_layers: Option<Vec<u8>>,
    /// SmolLM3: every this many layers, one without RoPE (the default of `no_rope_layers`).
    no_rope_layer_interval: Option<usize>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes `{"rope_theta": .., "rope_type": "default"}` here.
    rope_parameters: Option<serde_json::Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    /// Granite's scalars (transformers' defaults: 1).
    embedding_multiplier: Option<f64>,
    residual_multiplier: Option<f64>,
    attention_multiplier: Option<f64>,
    logits_scaling: Option<f64>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()),
        Some(serde_json::Value::Array(a)) => {
            a.first().and_then(|x| x.as_u64()).and_then(|x| u32::try_from(x).ok())
        }
        _ => None,
    }
}

/// The most layers a config may declare: far above any real model's (a few hundred), and a
/// bound on what a hostile file can make the loader list before its tensors are read.
pub const MAX_LAYERS: usize = 1 << 16;

/// Layers `n-1, 2n-1, ...` below `layers`: SmolLM3's NoPE layers for interval `n`
/// (transformers: layer `l` applies RoPE iff `(l + 1) % n != 0`). `layers` must already be
/// checked against [`MAX_LAYERS`].
fn every_nth_layer(layers: usize, n: usize) -> Vec<usize> {
    (0..layers.min(MAX_LAYERS)).filter(|l| (l + 1) % n == 0).collect()
}

/// Checks a list of layers (NoPE layers, full-attention layers): ascending layer indices below
/// `layers`; the error is a bare message (the list and the bound).
pub(crate) fn check_layer_list(list: &[usize], layers: usize) -> std::result::Result<(), String> {
    if list.windows(2).any(|w| w[0] >= w[1]) || list.last().is_some_and(|&l| l >= layers) {
        return Err(format!("{list:?} must be ascending layer indices below {layers}"));
    }
    Ok(())
}

impl LlamaConfig {
    /// Reads the config from GGUF metadata: `general.architecture` is `llama`, `qwen2` or
    /// `qwen3` ([`Arch`]), and its keys `<arch>.{block_count, embedding_length,
    /// feed_forward_length, attention.head_count, attention.head_count_kv, rope.freq_base,
    /// attention.layer_norm_rms_epsilon, context_length, vocab_size, attention.key_length,
    /// rope.dimension_count}`. The vocabulary falls back to the length of
    /// `tokenizer.ggml.tokens`, then to the rows of `token_embd.weight`; the embeddings are
    /// tied when the file has no `output.weight`; Llama's and Qwen3's `attention_bias` / `mlp_bias` are read off the first layer's tensors
    /// (`blk.0.attn_q.bias`, `blk.0.ffn_up.bias`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = match g.get_str("general.architecture")? {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "smollm3" => Arch::SmolLM3,
            "granite" => Arch::Granite,
            other => {
                return Err(g.error(format!(
                    "general.architecture is {other:?}; supported: \"llama\", \"qwen2\", \"qwen3\", \"smollm3\", \"granite\""
                )))
            }
        };
        let k = |s: &str| format!("{}.{s}", arch.gguf_name());
        let block_count = g.get_usize(&k("block_count"))?;
        if block_count > MAX_LAYERS {
            return Err(g.error(format!("{} {block_count} is more than {MAX_LAYERS} layers", k("block_count"))));
        }
        let hidden_size = g.get_usize(&k("embedding_length"))?;
        let num_attention_heads = g.get_usize(&k("attention.head_count"))?;
        let num_key_value_heads = match g.get(&k("attention.head_count_kv")) {
            Some(_) => g.get_usize(&k("attention.head_count_kv"))?,
            None => num_attention_heads,
        };
        let head_dim = match g.get(&k("attention.key_length")) {
            Some(_) => g.get_usize(&k("attention.key_length"))?,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        if g.get(&k("attention.value_length")).is_some() {
            let vl = g.get_usize(&k("attention.value_length"))?;
            if vl != head_dim {
                return Err(g.error(format!(
                    "{} {vl} differs from key_length {head_dim}",
                    k("attention.value_length")
                )));
            }
        }
        if g.get(&k("rope.dimension_count")).is_some() {
            let rd = g.get_usize(&k("rope.dimension_count"))?;
            if rd != head_dim {
                return Err(g.error(format!(
                    "{} {rd} differs from head_dim {head_dim}: partial RoPE is not supported",
                    k("rope.dimension_count")
                )));
            }
        }
        let mut rope_scaling = match g.get(&k("rope.scaling.type")) {
            None => RopeScaling::None,
            Some(_) => match g.get_str(&k("rope.scaling.type"))? {
                "none" => RopeScaling::None,
                "linear" => RopeScaling::Linear { factor: g.get_f64(&k("rope.scaling.factor"))? as f32 },
                other => {
                    return Err(g.error(format!(
                        "{} {other:?} is not supported (supported: none, linear, and Llama 3's rope_freqs)",
                        k("rope.scaling.type")
                    )))
                }
            },
        };
        if g.has_tensor("rope_freqs.weight") {
            if rope_scaling != RopeScaling::None {
                return Err(g.error(format!(
                    "both {} and a rope_freqs.weight tensor: which applies is ambiguous",
                    k("rope.scaling.type")
                )));
            }
            // Its length and values are checked with the rest (`check`, `Rope::check`).
            rope_scaling = RopeScaling::FreqFactors(g.tensor_f32("rope_freqs.weight")?.1);
        }
        // llama.cpp's Qwen converters write no `vocab_size`: the tokenizer's length, or else
        // the embedding's rows, say it.
        let vocab_size = match g.get(&k("vocab_size")) {
            Some(_) => g.get_usize(&k("vocab_size"))?,
            None if g.get("tokenizer.ggml.tokens").is_some() => g.get_str_array("tokenizer.ggml.tokens")?.len(),
            None => g.tensor_info("token_embd.weight")?.shape().first().copied().unwrap_or(0),
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match g.get(key) {
                None => Ok(None),
                Some(_) => u32::try_from(g.get_usize(key)?)
                    .map(Some)
                    .map_err(|_| g.error(format!("metadata {key:?} does not fit u32"))),
            }
        };
        // Qwen2's q/k/v biases come with the architecture; Llama's and Qwen3's optional ones
        // are all there or all absent (checked when the weights load).
        let attention_bias = arch != Arch::Qwen2
            && (g.has_tensor("blk.0.attn_q.bias") || g.has_tensor("blk.0.attn_output.bias"));
        let mlp_bias = g.has_tensor("blk.0.ffn_up.bias") || g.has_tensor("blk.0.ffn_down.bias");
        let cfg = LlamaConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: g.get_usize(&k("feed_forward_length"))?,
            num_hidden_layers: block_count,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta: match g.get(&k("rope.freq_base")) {
                Some(_) => g.get_f64(&k("rope.freq_base"))? as f32,
                None => 10000.0,
            },
            rope_scaling,
            rms_norm_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon"))? as f32,
            max_position_embeddings: g.get_usize(&k("context_length"))?,
            tie_word_embeddings: !g.has_tensor("output.weight"),
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?,
            attention_bias,
            mlp_bias,
            // llama.cpp's converters keep no sliding window for these architectures (it runs
            // Mistral 7B v0.1 with full attention).
            sliding_window: None,
            full_attention_layers: vec![],
            // llama.cpp writes no key for SmolLM3's NoPE layers: it skips RoPE in every 4th.
            nope_layers: if arch == Arch::SmolLM3 { every_nth_layer(block_count, 4) } else { vec![] },
            multipliers: match arch {
                // llama.cpp's Granite converter writes each scalar the config has; llama.cpp
                // reads a missing one as no scaling (the attention's: 1 / sqrt(head_dim)).
                Arch::Granite => {
                    let scale = |key: &str, absent: f32| -> Result<f32> {
                        match g.get(&k(key)) {
                            Some(_) => Ok(g.get_f64(&k(key))? as f32),
                            None => Ok(absent),
                        }
                    };
                    Some(Multipliers {
                        embedding: scale("embedding_scale", 1.0)?,
                        residual: scale("residual_scale", 1.0)?,
                        attention: scale("attention.scale", 1.0 / (head_dim.max(1) as f32).sqrt())?,
                        logits_scaling: scale("logit_scale", 1.0)?,
                    })
                }
                _ => None,
            },
        };
        cfg.check().map_err(|m| g.error(m))?;
        Ok(cfg)
    }

    /// Reads an HF `config.json` (`model_type` `llama` or absent, `mistral`, `qwen2`, `qwen3` or
    /// `smollm3`; their sliding windows as transformers applies them, see
    /// [`LlamaConfig::sliding_window`]; RoPE as [`Rope::scaling_from_hf`] reads it; `attention_bias`,
    /// `mlp_bias`; `hidden_act` `silu`). Missing fields take transformers' `LlamaConfig` defaults
    /// (`rope_theta` 10000, `rms_norm_eps` 1e-6, `max_position_embeddings` 2048,
    /// `tie_word_embeddings` false); `rope_theta` may also come from transformers 5's
    /// `rope_parameters`.
    pub fn from_hf_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_hf_str(&text).map_err(|m| Error::format(path, m))
    }

    /// Parses the text of an HF `config.json`; the error is a message without the path.
    fn from_hf_str(text: &str) -> std::result::Result<Self, String> {
        let h: HfConfig = serde_json::from_str(text).map_err(|e| format!("config.json: {e}"))?;
        if h.num_hidden_layers > MAX_LAYERS {
            return Err(format!("num_hidden_layers {} is more than {MAX_LAYERS}", h.num_hidden_layers));
        }
        let ctx = h.max_position_embeddings.unwrap_or(2048) as u64;
        // The sliding window, if it cuts attention short: none when null or no shorter than the
        // context (the model is then plain causal); anything but a positive integer is an error.
        let window_cuts = || -> std::result::Result<Option<usize>, String> {
            let Some(w) = h.sliding_window.as_ref().filter(|w| !w.is_null()) else { return Ok(None) };
            match w.as_u64().filter(|&w| w > 0).and_then(|w| usize::try_from(w).ok()) {
                Some(w) => Ok(((w as u64) < ctx).then_some(w)),
                None => Err(format!("sliding_window {w} is not a positive integer")),
            }
        };
        let mut sliding_window = None;
        let arch = match h.model_type.as_deref() {
            None | Some("llama") => Arch::Llama,
            // Mistral is Llama's architecture plus an optional sliding window in every layer
            // (Mistral 7B v0.1; none from v0.2 on). transformers' Mistral ignores `layer_types`.
            Some("mistral") => {
                sliding_window = window_cuts()?;
                Arch::Llama
            }
            // Qwen2, Qwen3 and SmolLM3 carry a `sliding_window` that applies only with
            // `use_sliding_window`, in the layers `layer_types` (or its default) says.
            Some(mt @ ("qwen2" | "qwen3" | "smollm3")) => {
                if h.use_sliding_window == Some(true) {
                    sliding_window = window_cuts()?;
                }
                match mt {
                    "qwen2" | "qwen3" if h.mlp_bias == Some(true) => {
                        return Err(format!("model_type {mt:?} with mlp_bias is not supported"))
                    }
                    "qwen2" => Arch::Qwen2,
                    "qwen3" => Arch::Qwen3,
                    _ => Arch::SmolLM3,
                }
            }
            Some("granite") => Arch::Granite,
            Some(mt) => {
                return Err(format!(
                    "model_type {mt:?}; supported: \"llama\", \"mistral\", \"qwen2\", \"qwen3\", \"smollm3\", \"granite\""
                ))
            }
        };
        // SmolLM3's NoPE layers: the list, else every `no_rope_layer_interval`-th (default 4).
        let nope_layers = match (arch, &h.no_rope_layers) {
            (Arch::SmolLM3, Some(flags)) => {
                if flags.len() != h.num_hidden_layers || flags.iter().any(|&f| f > 1) {
                    return Err(format!(
                        "no_rope_layers must hold one 0 or 1 per layer ({} layers), got {flags:?}",
                        h.num_hidden_layers
                    ));
                }
                flags.iter().enumerate().filter(|(_, &f)| f == 0).map(|(l, _)| l).collect()
            }
            (Arch::SmolLM3, None) => match h.no_rope_layer_interval.unwrap_or(4) {
                0 => return Err("no_rope_layer_interval must be positive".into()),
                n => every_nth_layer(h.num_hidden_layers, n),
            },
            _ => vec![],
        };
        // Which layers the window spares: `layer_types`' `full_attention` ones, else Qwen's
        // below `max_window_layers` (transformers' default 28) and SmolLM3's RoPE layers.
        let may_slide = !matches!(h.model_type.as_deref(), None | Some("llama"));
        let sliding: Vec<bool> = match &h.layer_types {
            Some(kinds) => {
                if kinds.len() != h.num_hidden_layers {
                    return Err(format!(
                        "layer_types has {} entries for {} layers",
                        kinds.len(),
                        h.num_hidden_layers
                    ));
                }
                let mut flags = Vec::with_capacity(kinds.len());
                for kind in kinds {
                    flags.push(match kind.as_str() {
                        "full_attention" => false,
                        "sliding_attention" if may_slide => true,
                        other => {
                            return Err(format!(
                                "layer_types holds {other:?}; supported: \"full_attention\", and \"sliding_attention\" for Mistral, Qwen2, Qwen3 and SmolLM3"
                            ))
                        }
                    });
                }
                flags
            }
            None => match arch {
                Arch::Qwen2 | Arch::Qwen3 => {
                    let from = h.max_window_layers.unwrap_or(28);
                    (0..h.num_hidden_layers).map(|l| l >= from).collect()
                }
                Arch::SmolLM3 => (0..h.num_hidden_layers).map(|l| nope_layers.binary_search(&l).is_ok()).collect(),
                Arch::Llama | Arch::Granite => vec![true; h.num_hidden_layers],
            },
        };
        let (sliding_window, full_attention_layers) = match sliding_window {
            // transformers' Mistral windows every layer whatever `layer_types` says.
            Some(w) if h.model_type.as_deref() == Some("mistral") => (Some(w), vec![]),
            Some(w) if sliding.iter().any(|&s| s) => {
                (Some(w), sliding.iter().enumerate().filter(|(_, &s)| !s).map(|(l, _)| l).collect())
            }
            _ => (None, vec![]),
        };
        // transformers < 5: `rope_theta` + `rope_scaling`; transformers 5: `rope_parameters`
        // holding both. A file may carry either or both, as long as they agree.
        let mut rope_theta = h.rope_theta;
        let mut rope_scaling = match &h.rope_scaling {
            Some(rs) => Some(Rope::scaling_from_hf(rs, h.max_position_embeddings).map_err(|m| format!("rope_scaling: {m}"))?),
            None => None,
        };
        if let Some(rp) = h.rope_parameters.as_ref().filter(|v| !v.is_null()) {
            let from_params =
                Rope::scaling_from_hf(rp, h.max_position_embeddings).map_err(|m| format!("rope_parameters: {m}"))?;
            if rope_scaling.as_ref().is_some_and(|r| *r != from_params) {
                return Err(format!("rope_scaling and rope_parameters {rp} differ"));
            }
            rope_scaling = Some(from_params);
            if let Some(t) = rp.get("rope_theta") {
                let t =
                    t.as_f64().ok_or_else(|| format!("rope_parameters.rope_theta {t} is not a number"))?;
                if rope_theta.is_some_and(|r| r != t) {
                    return Err(format!(
                        "rope_theta {rope_theta:?} and rope_parameters.rope_theta {t} differ"
                    ));
                }
                rope_theta = Some(t);
            }
        }
        if let Some(act) = &h.hidden_act {
            if act != "silu" {
                return Err(format!("hidden_act {act:?}; only \"silu\" is supported"));
            }
        }
        let head_dim = match h.head_dim {
            Some(d) => d,
            None if h.num_attention_heads > 0 => h.hidden_size / h.num_attention_heads,
            None => 0,
        };
        let cfg = LlamaConfig {
            arch,
            vocab_size: h.vocab_size,
            hidden_size: h.hidden_size,
            intermediate_size: h.intermediate_size,
            num_hidden_layers: h.num_hidden_layers,
            num_attention_heads: h.num_attention_heads,
            num_key_value_heads: h.num_key_value_heads.unwrap_or(h.num_attention_heads),
            head_dim,
            rope_theta: rope_theta.unwrap_or(10000.0) as f32,
            rope_scaling: rope_scaling.unwrap_or_default(),
            rms_norm_eps: h.rms_norm_eps.unwrap_or(1e-6) as f32,
            max_position_embeddings: h.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: h.tie_word_embeddings.unwrap_or(false),
            bos_token_id: first_id(&h.bos_token_id),
            eos_token_id: first_id(&h.eos_token_id),
            // Qwen2's q/k/v biases come with the architecture ([`LlamaConfig::has_bias`]).
            attention_bias: arch != Arch::Qwen2 && h.attention_bias == Some(true),
            mlp_bias: h.mlp_bias == Some(true),
            sliding_window,
            full_attention_layers,
            nope_layers,
            multipliers: (arch == Arch::Granite).then(|| Multipliers {
                embedding: h.embedding_multiplier.unwrap_or(1.0) as f32,
                residual: h.residual_multiplier.unwrap_or(1.0) as f32,
                attention: h.attention_multiplier.unwrap_or(1.0) as f32,
                logits_scaling: h.logits_scaling.unwrap_or(1.0) as f32,
            }),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks that every size is positive, `num_key_value_heads` divides
    /// `num_attention_heads`, `head_dim` is even, every matrix size fits, and `rope_theta` and
    /// `rms_norm_eps` are finite and positive; the error is an [`Error::Invalid`] on `config`.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|m| Error::invalid("config", m))
    }

    /// [`LlamaConfig::validate`] with the error as a bare message.
    fn check(&self) -> std::result::Result<(), String> {
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, v) in dims {
            if v == 0 {
                return Err(format!("{name} must be positive, got 0"));
            }
        }
        if self.num_hidden_layers > MAX_LAYERS {
            return Err(format!("num_hidden_layers {} is more than {MAX_LAYERS}", self.num_hidden_layers));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_key_value_heads {} does not divide num_attention_heads {}",
                self.num_key_value_heads, self.num_attention_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        // Every matrix must be addressable: vocab*hidden, heads*head_dim*hidden, ...
        let prods = [
            self.vocab_size.checked_mul(self.hidden_size),
            self.q_dim().checked_mul(self.hidden_size),
            self.intermediate_size.checked_mul(self.hidden_size),
        ];
        if prods.iter().any(|p| p.map_or(true, |p| p > isize::MAX as usize / 4)) {
            return Err("matrix sizes overflow".into());
        }
        self.rope().check(self.head_dim)?;
        check_layer_list(&self.nope_layers, self.num_hidden_layers).map_err(|m| format!("nope_layers {m}"))?;
        check_layer_list(&self.full_attention_layers, self.num_hidden_layers)
            .map_err(|m| format!("full_attention_layers {m}"))?;
        if self.sliding_window == Some(0) {
            return Err("sliding_window must be positive, got 0".into());
        }
        match (self.arch, &self.multipliers) {
            (Arch::Granite, Some(m)) => {
                for (name, v) in [
                    ("embedding_multiplier", m.embedding),
                    ("residual_multiplier", m.residual),
                    ("attention_multiplier", m.attention),
                    ("logits_scaling", m.logits_scaling),
                ] {
                    if !(v.is_finite() && v > 0.0) {
                        return Err(format!("{name} {v} must be finite and positive"));
                    }
                }
            }
            (Arch::Granite, None) => return Err("a Granite config without its multipliers".into()),
            (_, Some(_)) => return Err("multipliers are Granite's only".into()),
            (_, None) => {}
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps {} must be finite and positive", self.rms_norm_eps));
        }
        Ok(())
    }

    /// The sliding window of layer `l`, if it has one ([`LlamaConfig::sliding_window`]).
    pub fn window_at(&self, l: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.full_attention_layers.binary_search(&l).is_err())
    }

    /// RoPE's base and scaling.
    pub fn rope(&self) -> Rope {
        Rope { theta: self.rope_theta, scaling: self.rope_scaling.clone() }
    }

    /// Width of all query heads together: `num_attention_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads.saturating_mul(self.head_dim)
    }

    /// Width of all key (or value) heads together: `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads.saturating_mul(self.head_dim)
    }

    /// `(d_out, d_in)` of a linear module by its HF name (`q_proj`, `k_proj`, `v_proj`,
    /// `o_proj`, `gate_proj`, `up_proj`, `down_proj`).
    pub fn linear_shape(&self, module: &str) -> Result<(usize, usize)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        Ok(match module {
            "q_proj" => (self.q_dim(), h),
            "k_proj" | "v_proj" => (self.kv_dim(), h),
            "o_proj" => (h, self.q_dim()),
            "gate_proj" | "up_proj" => (i, h),
            "down_proj" => (h, i),
            other => {
                return Err(Error::invalid(
                    "module",
                    format!("{other:?} is not a Llama linear module (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)"),
                ))
            }
        })
    }

    /// Whether linear module `m` (index into [`super::llama::MODULES`]: q, k, v, o, gate, up,
    /// down) has a bias.
    pub fn has_bias(&self, m: usize) -> bool {
        match (self.arch, m) {
            (Arch::Qwen2, 0..=2) => true,
            (Arch::Qwen2, _) => false,
            (_, 0..=3) => self.attention_bias,
            _ => self.mlp_bias,
        }
    }

    /// Whether every query and key head is RMS-normed before RoPE (Qwen3's `q_norm`, `k_norm`).
    pub fn qk_norm(&self) -> bool {
        self.arch == Arch::Qwen3
    }

    /// The HF `config.json` for this model (`LlamaForCausalLM`, `Qwen2ForCausalLM` or
    /// `Qwen3ForCausalLM`, float32). A GGUF's RoPE frequency factors are written as the Llama 3
    /// `rope_scaling` they were made from ([`Rope::hf_scaling`]); factors that follow no such
    /// rule are an [`Error::Invalid`] on `rope_scaling`, since `config.json` cannot say them.
    pub fn to_hf_json(&self) -> Result<serde_json::Value> {
        let rope_scaling =
            self.rope().hf_scaling(self.head_dim).map_err(|m| Error::invalid("rope_scaling", m))?;
        let mut v = serde_json::json!({
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta as f64,
            "rope_scaling": rope_scaling,
            "rms_norm_eps": self.rms_norm_eps as f64,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        });
        // Layer kinds, for the families whose sliding window is per layer.
        let layer_types: Vec<&str> = (0..self.num_hidden_layers)
            .map(|l| if self.window_at(l).is_some() { "sliding_attention" } else { "full_attention" })
            .collect();
        let window = |extra: serde_json::Value| -> serde_json::Value {
            let mut extra = extra;
            let m = extra.as_object_mut().expect("an object");
            match self.sliding_window {
                Some(w) => {
                    m.insert("use_sliding_window".into(), true.into());
                    m.insert("sliding_window".into(), w.into());
                    m.insert("layer_types".into(), serde_json::json!(layer_types));
                }
                None => {
                    m.insert("use_sliding_window".into(), false.into());
                }
            }
            extra
        };
        let extra = match self.arch {
            Arch::Llama if self.sliding_window.is_none() => serde_json::json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "attention_bias": self.attention_bias,
                "mlp_bias": self.mlp_bias,
            }),
            Arch::Llama if self.attention_bias || self.mlp_bias || !self.full_attention_layers.is_empty() => {
                return Err(Error::invalid(
                    "config",
                    "a Llama with a sliding window and biases or full-attention layers: no HF architecture has both",
                ))
            }
            Arch::Llama => serde_json::json!({
                "architectures": ["MistralForCausalLM"],
                "model_type": "mistral",
                "sliding_window": self.sliding_window,
            }),
            Arch::Qwen2 => window(serde_json::json!({
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
            })),
            Arch::Qwen3 => window(serde_json::json!({
                "architectures": ["Qwen3ForCausalLM"],
                "model_type": "qwen3",
                "attention_bias": self.attention_bias,
            })),
            Arch::Granite => {
                let m = self.multipliers.ok_or_else(|| Error::invalid("config", "a Granite config without its multipliers"))?;
                if self.sliding_window.is_some() {
                    return Err(Error::invalid("config", "a Granite with a sliding window: transformers' Granite has none"));
                }
                serde_json::json!({
                    "architectures": ["GraniteForCausalLM"],
                    "model_type": "granite",
                    "attention_bias": self.attention_bias,
                    "mlp_bias": self.mlp_bias,
                    "embedding_multiplier": m.embedding as f64,
                    "residual_multiplier": m.residual as f64,
                    "attention_multiplier": m.attention as f64,
                    "logits_scaling": m.logits_scaling as f64,
                })
            }
            Arch::SmolLM3 => window(serde_json::json!({
                "architectures": ["SmolLM3ForCausalLM"],
                "model_type": "smollm3",
                "attention_bias": self.attention_bias,
                "mlp_bias": self.mlp_bias,
                "no_rope_layers": (0..self.num_hidden_layers).map(|l| u8::from(!self.nope_layers.contains(&l))).collect::<Vec<_>>(),
            })),
        };
        let map = v.as_object_mut().expect("an object");
        for (key, val) in extra.as_object().expect("an object") {
            map.insert(key.clone(), val.clone());
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_json_round_trip() {
        let cfg = LlamaConfig {
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            rope_theta: 100000.0,
            rope_scaling: RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 16,
            },
            rms_norm_eps: 1e-5,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            arch: Arch::Llama,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: None,
            full_attention_layers: vec![],
            nope_layers: vec![],
            multipliers: None,
        };
        let text = cfg.to_hf_json().unwrap().to_string();
        assert_eq!(LlamaConfig::from_hf_str(&text).unwrap(), cfg);
        // Every family and bias setting survives the round trip.
        for (arch, attention_bias, mlp_bias) in [
            (Arch::Llama, true, true),
            (Arch::Llama, false, true),
            (Arch::Qwen2, false, false),
            (Arch::Qwen3, true, false),
            (Arch::Qwen3, false, false),
            (Arch::SmolLM3, false, false),
            (Arch::Granite, false, false),
            (Arch::Granite, true, true),
        ] {
            let nope_layers = if arch == Arch::SmolLM3 { vec![1] } else { vec![] };
            let multipliers = (arch == Arch::Granite)
                .then_some(Multipliers { embedding: 12.0, residual: 0.22, attention: 0.0078125, logits_scaling: 8.0 });
            let c = LlamaConfig { arch, attention_bias, mlp_bias, nope_layers, multipliers, ..cfg.clone() };
            let text = c.to_hf_json().unwrap().to_string();
            assert_eq!(LlamaConfig::from_hf_str(&text).unwrap(), c, "{text}");
            if arch == Arch::Granite {
                // Granite has no sliding window, and its scalars must be positive.
                assert!(LlamaConfig { sliding_window: Some(5), ..c.clone() }.to_hf_json().is_err());
                let bad = Multipliers { residual: 0.0, ..multipliers.unwrap() };
                assert!(LlamaConfig { multipliers: Some(bad), ..c.clone() }.validate().is_err());
                assert!(LlamaConfig { multipliers: None, ..c.clone() }.validate().is_err());
                assert!(LlamaConfig { arch: Arch::Llama, ..c.clone() }.validate().is_err());
                continue;
            }
            // With a sliding window: in every layer (Mistral's only form), in some layers.
            let full: &[Vec<usize>] = if arch == Arch::Llama { &[] } else { &[vec![], vec![0]] };
            for full_attention_layers in full.iter().cloned() {
                let c = LlamaConfig { sliding_window: Some(5), full_attention_layers, ..c.clone() };
                let text = c.to_hf_json().unwrap().to_string();
                assert_eq!(LlamaConfig::from_hf_str(&text).unwrap(), c, "{text}");
            }
        }
        let mistral = LlamaConfig { sliding_window: Some(5), ..cfg.clone() };
        let text = mistral.to_hf_json().unwrap().to_string();
        assert!(text.contains("MistralForCausalLM"), "{text}");
        assert_eq!(LlamaConfig::from_hf_str(&text).unwrap(), mistral);
        // A Llama windowed in some layers only is no HF architecture.
        assert!(LlamaConfig { full_attention_layers: vec![1], ..mistral }.to_hf_json().is_err());
    }

    #[test]
    fn smollm3_configs_name_their_nope_layers() {
        let base = r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":8,"num_attention_heads":2,"model_type":"smollm3""#;
        let c = LlamaConfig::from_hf_str(&format!("{base}}}")).unwrap();
        assert_eq!((c.arch, &c.nope_layers[..]), (Arch::SmolLM3, &[3, 7][..]));
        let c = LlamaConfig::from_hf_str(&format!("{base},\"no_rope_layer_interval\":3}}")).unwrap();
        assert_eq!(c.nope_layers, [2, 5]);
        let c = LlamaConfig::from_hf_str(&format!("{base},\"no_rope_layers\":[1,0,1,1,1,1,1,0]}}")).unwrap();
        assert_eq!(c.nope_layers, [1, 7]);
        for bad in ["[1,0]", "[1,1,1,1,1,1,1,2]"] {
            let e = LlamaConfig::from_hf_str(&format!("{base},\"no_rope_layers\":{bad}}}")).unwrap_err();
            assert!(e.contains("no_rope_layers"), "{e}");
        }
        assert!(LlamaConfig::from_hf_str(&format!("{base},\"no_rope_layer_interval\":0}}")).is_err());
        // A hostile layer count is refused before any per-layer list is made.
        let huge = base.replace("\"num_hidden_layers\":8", "\"num_hidden_layers\":1000000000000000000");
        assert!(LlamaConfig::from_hf_str(&format!("{huge}}}")).unwrap_err().contains("num_hidden_layers"));
    }

    #[test]
    fn qwen_configs_read_their_family() {
        let base = r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,"num_attention_heads":2,"max_position_embeddings":4096"#;
        let q2 = LlamaConfig::from_hf_str(&format!(
            "{base},\"model_type\":\"qwen2\",\"sliding_window\":1024,\"use_sliding_window\":false}}"
        ))
        .unwrap();
        assert_eq!(q2.arch, Arch::Qwen2);
        assert_eq!((0..7).map(|m| q2.has_bias(m)).collect::<Vec<_>>(), [true, true, true, false, false, false, false]);
        assert!(!q2.qk_norm());
        assert_eq!(q2.sliding_window, None);
        // use_sliding_window: the window from layer max_window_layers on (default 28: none of
        // these two), or where layer_types says.
        let q = |extra: &str| LlamaConfig::from_hf_str(&format!("{base},\"model_type\":\"qwen2\",\"sliding_window\":1024{extra}}}"));
        let on = q(",\"use_sliding_window\":true").unwrap();
        assert_eq!(on.sliding_window, None);
        let on = q(",\"use_sliding_window\":true,\"max_window_layers\":1").unwrap();
        assert_eq!((on.sliding_window, &on.full_attention_layers[..]), (Some(1024), &[0][..]));
        assert_eq!((on.window_at(0), on.window_at(1)), (None, Some(1024)));
        let on = q(",\"use_sliding_window\":true,\"max_window_layers\":1,\"layer_types\":[\"sliding_attention\",\"full_attention\"]").unwrap();
        assert_eq!((on.window_at(0), on.window_at(1)), (Some(1024), None));
        // Without use_sliding_window, layer_types' sliding layers attend to everything.
        let off = q(",\"layer_types\":[\"sliding_attention\",\"sliding_attention\"]").unwrap();
        assert_eq!(off.sliding_window, None);
        // A window no shorter than the context cuts nothing.
        let long = LlamaConfig::from_hf_str(&format!(
            "{base},\"model_type\":\"qwen2\",\"sliding_window\":4096,\"use_sliding_window\":true,\"max_window_layers\":0}}"
        ))
        .unwrap();
        assert_eq!(long.sliding_window, None);
        for bad in [",\"layer_types\":[\"full_attention\"]", ",\"layer_types\":[\"full_attention\",\"chunked_attention\"]"] {
            let e = q(bad).unwrap_err();
            assert!(e.contains("layer_types"), "{e}");
        }
        // Llama has no sliding layers.
        let e = LlamaConfig::from_hf_str(&format!("{base},\"layer_types\":[\"full_attention\",\"sliding_attention\"]}}"))
            .unwrap_err();
        assert!(e.contains("sliding_attention"), "{e}");
        // SmolLM3: by default the window is on its NoPE layers.
        let sm = LlamaConfig::from_hf_str(&format!(
            "{},\"model_type\":\"smollm3\",\"sliding_window\":64,\"use_sliding_window\":true}}",
            base.replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":8")
        ))
        .unwrap();
        assert_eq!((0..8).map(|l| sm.window_at(l).is_some()).collect::<Vec<_>>(), [false, false, false, true, false, false, false, true]);
        let q3 = LlamaConfig::from_hf_str(&format!("{base},\"model_type\":\"qwen3\",\"head_dim\":6}}")).unwrap();
        assert!(q3.qk_norm() && (0..7).all(|m| !q3.has_bias(m)));
        assert_eq!(q3.head_dim, 6);
        let q3b = LlamaConfig::from_hf_str(&format!("{base},\"model_type\":\"qwen3\",\"attention_bias\":true}}")).unwrap();
        assert_eq!((0..7).map(|m| q3b.has_bias(m)).collect::<Vec<_>>(), [true, true, true, true, false, false, false]);
        let l = LlamaConfig::from_hf_str(&format!("{base},\"mlp_bias\":true}}")).unwrap();
        assert_eq!((0..7).map(|m| l.has_bias(m)).collect::<Vec<_>>(), [false, false, false, false, true, true, true]);
        assert!(LlamaConfig::from_hf_str(&format!("{base},\"model_type\":\"qwen3\",\"mlp_bias\":true}}")).is_err());
    }

    #[test]
    fn hf_json_rejects_bad_configs() {
        let base = r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,"num_attention_heads":2"#;
        assert!(LlamaConfig::from_hf_str(&format!("{base}}}")).is_ok());
        assert!(LlamaConfig::from_hf_str(&format!("{base},\"num_key_value_heads\":3}}")).is_err());
        assert!(LlamaConfig::from_hf_str(&format!("{base},\"model_type\":\"gpt2\"}}")).is_err());
        // Mistral: the Llama architecture when no window cuts attention short.
        let llama = LlamaConfig::from_hf_str(&format!("{base}}}")).unwrap();
        for ok in ["null", "2048", "4096"] {
            let m = LlamaConfig::from_hf_str(&format!("{base},\"model_type\":\"mistral\",\"sliding_window\":{ok}}}"));
            assert_eq!(m.unwrap(), llama, "sliding_window {ok}");
        }
        // Mistral 7B v0.1: a window shorter than the context, in every layer (whatever
        // layer_types says, as transformers' Mistral).
        let m = LlamaConfig::from_hf_str(&format!("{base},\"model_type\":\"mistral\",\"sliding_window\":1024}}")).unwrap();
        assert_eq!((m.sliding_window, m.window_at(0), m.window_at(1)), (Some(1024), Some(1024), Some(1024)));
        assert_eq!(LlamaConfig::from_hf_str(&m.to_hf_json().unwrap().to_string()).unwrap(), m);
        let typed = LlamaConfig::from_hf_str(&format!(
            "{base},\"model_type\":\"mistral\",\"sliding_window\":1024,\"layer_types\":[\"full_attention\",\"sliding_attention\"]}}"
        ))
        .unwrap();
        assert_eq!(typed, m);
        assert!(LlamaConfig::from_hf_str(&format!("{base},\"model_type\":\"mistral\",\"sliding_window\":0}}")).is_err());
        // linear needs its factor; YaRN is not supported.
        assert!(
            LlamaConfig::from_hf_str(&format!("{base},\"rope_scaling\":{{\"type\":\"linear\"}}}}")).is_err()
        );
        let lin = LlamaConfig::from_hf_str(&format!("{base},\"rope_scaling\":{{\"type\":\"linear\",\"factor\":2}}}}"));
        assert_eq!(lin.unwrap().rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let yarn = LlamaConfig::from_hf_str(&format!("{base},\"rope_scaling\":{{\"rope_type\":\"yarn\",\"factor\":2}}}}"));
        assert!(yarn.unwrap_err().contains("yarn"));
        assert!(LlamaConfig::from_hf_str(&format!("{base},\"rms_norm_eps\":-1}}")).is_err());
        assert!(LlamaConfig::from_hf_str("{}").is_err());
        let v5 = LlamaConfig::from_hf_str(&format!(
            "{base},\"rope_parameters\":{{\"rope_theta\":100000.0,\"rope_type\":\"default\"}}}}"
        ))
        .unwrap();
        assert_eq!(v5.rope_theta, 100000.0);
        assert!(!v5.tie_word_embeddings);
        // transformers 5 puts Llama 3's scaling into rope_parameters, next to the base.
        assert!(LlamaConfig::from_hf_str(&format!(
            "{base},\"rope_parameters\":{{\"rope_theta\":1.0,\"rope_type\":\"llama3\"}}}}"
        ))
        .is_err());
        let l3 = LlamaConfig::from_hf_str(&format!(
            "{base},\"max_position_embeddings\":4096,\"rope_parameters\":{{\"rope_theta\":500000.0,\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0}}}}"
        ))
        .unwrap();
        assert_eq!(l3.rope_theta, 500000.0);
        assert_eq!(
            l3.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 4096
            }
        );
        // Both spellings, disagreeing.
        assert!(LlamaConfig::from_hf_str(&format!(
            "{base},\"rope_scaling\":{{\"rope_type\":\"linear\",\"factor\":2}},\"rope_parameters\":{{\"rope_type\":\"linear\",\"factor\":3}}}}"
        ))
        .is_err());
        assert!(LlamaConfig::from_hf_str(&format!(
            "{base},\"rope_theta\":5.0,\"rope_parameters\":{{\"rope_theta\":1.0}}}}"
        ))
        .is_err());
    }
}
