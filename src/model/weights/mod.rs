//! Llama weights in f32 with Hugging Face names and layout, loaded from a GGUF file
//! ([`gguf`]) or an HF safetensors directory ([`safetensors`]), and saved as the latter.
//!
//! Layout (as `nn.Linear` / `nn.Embedding`): every projection is `d_out x d_in` row-major, so
//! `y = x W^T`; `embed_tokens` is `vocab x hidden`; norms are vectors of `hidden`.
//!
//! | HF name (`model.layers.N.` prefix) | GGUF name (`blk.N.` prefix) | shape |
//! |---|---|---|
//! | `model.embed_tokens.weight` | `token_embd.weight` | vocab x hidden |
//! | `self_attn.q_proj.weight` | `attn_q.weight` (rows permuted) | heads*head_dim x hidden |
//! | `self_attn.k_proj.weight` | `attn_k.weight` (rows permuted) | kv_heads*head_dim x hidden |
//! | `self_attn.v_proj.weight` | `attn_v.weight` | kv_heads*head_dim x hidden |
//! | `self_attn.o_proj.weight` | `attn_output.weight` | hidden x heads*head_dim |
//! | `mlp.gate_proj.weight` | `ffn_gate.weight` | intermediate x hidden |
//! | `mlp.up_proj.weight` | `ffn_up.weight` | intermediate x hidden |
//! | `mlp.down_proj.weight` | `ffn_down.weight` | hidden x intermediate |
//! | `input_layernorm.weight` | `attn_norm.weight` | hidden |
//! | `post_attention_layernorm.weight` | `ffn_norm.weight` | hidden |
//! | `model.norm.weight` | `output_norm.weight` | hidden |
//! | `lm_head.weight` (absent when tied) | `output.weight` (absent when tied) | vocab x hidden |
//! | `self_attn.q_proj.bias`, ... (where the config has biases) | `attn_q.bias`, ... | d_out |
//! | `self_attn.q_norm.weight`, `k_norm` (Qwen3) | `attn_q_norm.weight`, `attn_k_norm` | head_dim |
//!
//! For the `llama` architecture, llama.cpp's converter permutes the rows of `q_proj`/`k_proj`
//! (and their biases) so that RoPE rotates adjacent pairs `(x[2i], x[2i+1])`. The loader undoes
//! it ([`unpermute_qk_rows`]) so the model uses HF's rotate-half RoPE on
//! `(x[i], x[i + head_dim/2])`: within head `h`, HF row `h*head_dim + half*head_dim/2 + j` =
//! GGUF row `h*head_dim + 2j + half`. So does `smollm3` (converted as a Llama). Qwen2 and
//! Qwen3 GGUFs keep HF's order (llama.cpp runs them with rotate-half RoPE).

pub mod gguf;
pub mod safetensors;

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};
use crate::shape::Mat;

use super::config::{Arch, LlamaConfig};
use gguf::GgufFile;

/// A dense f32 tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Dimensions, slowest first (`[rows, cols]` for a matrix).
    pub shape: Vec<usize>,
    /// `prod(shape)` values, row-major.
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor of `shape` holding `data`; `data.len()` must equal the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n != Some(data.len()) {
            return Err(Error::invalid(
                "data",
                format!("shape {shape:?} needs {n:?} values, got {}", data.len()),
            ));
        }
        Ok(Tensor { shape, data })
    }

    /// Rows of a matrix (the first dimension; the length of a vector).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Columns of a matrix (product of the dimensions after the first; 1 for a vector).
    pub fn cols(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// A checked row-major `rows x cols` view.
    pub fn mat(&self, name: &'static str) -> Result<Mat<'_, f32>> {
        Mat::new(name, &self.data, self.rows(), self.cols())
    }
}

/// The names of the seven linear modules of a Llama block, in HF order.
pub const LINEAR_MODULES: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The weights of one transformer block.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    pub q_proj: Tensor,
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    pub o_proj: Tensor,
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    pub down_proj: Tensor,
    /// RMSNorm weight before attention (`hidden`).
    pub input_layernorm: Tensor,
    /// RMSNorm weight before the MLP (`hidden`).
    pub post_attention_layernorm: Tensor,
    /// The biases (`d_out`) of the linear modules that have one ([`LlamaConfig::has_bias`]),
    /// in [`LINEAR_MODULES`] order.
    pub biases: [Option<Tensor>; 7],
    /// Qwen3's RMSNorm weights (`head_dim`) of every query head and every key head.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

impl LayerWeights {
    /// The linear module called `module` (one of [`LINEAR_MODULES`]).
    pub fn linear(&self, module: &str) -> Result<&Tensor> {
        Ok(match module {
            "q_proj" => &self.q_proj,
            "k_proj" => &self.k_proj,
            "v_proj" => &self.v_proj,
            "o_proj" => &self.o_proj,
            "gate_proj" => &self.gate_proj,
            "up_proj" => &self.up_proj,
            "down_proj" => &self.down_proj,
            other => {
                return Err(Error::invalid("module", format!("{other:?} is not one of {LINEAR_MODULES:?}")))
            }
        })
    }

    /// The linear module called `module`, mutable (to merge an adapter into it).
    pub fn linear_mut(&mut self, module: &str) -> Result<&mut Tensor> {
        Ok(match module {
            "q_proj" => &mut self.q_proj,
            "k_proj" => &mut self.k_proj,
            "v_proj" => &mut self.v_proj,
            "o_proj" => &mut self.o_proj,
            "gate_proj" => &mut self.gate_proj,
            "up_proj" => &mut self.up_proj,
            "down_proj" => &mut self.down_proj,
            other => {
                return Err(Error::invalid("module", format!("{other:?} is not one of {LINEAR_MODULES:?}")))
            }
        })
    }

    /// The tensor of a [`layer_fields`] name (`q_proj`, `q_proj.bias`, `q_norm`, ...), if the
    /// layer has it.
    pub fn field(&self, field: &str) -> Option<&Tensor> {
        match field {
            "input_layernorm" => Some(&self.input_layernorm),
            "post_attention_layernorm" => Some(&self.post_attention_layernorm),
            "q_norm" => self.q_norm.as_ref(),
            "k_norm" => self.k_norm.as_ref(),
            f => match f.strip_suffix(".bias") {
                Some(m) => LINEAR_MODULES.iter().position(|x| *x == m).and_then(|i| self.biases[i].as_ref()),
                None => self.linear(f).ok(),
            },
        }
    }
}

/// All weights of a Llama model in f32, HF names and layout.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaWeights {
    pub config: LlamaConfig,
    /// `vocab x hidden`.
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm weight (`hidden`).
    pub norm: Tensor,
    /// `vocab x hidden`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
}

/// The HF safetensors name of a per-layer tensor (`model.layers.3.self_attn.q_proj.weight`)
/// from its [`layer_fields`] name (`q_proj`, `q_proj.bias`, `q_norm`, `input_layernorm`).
pub fn hf_layer_name(layer: usize, field: &str) -> String {
    let (base, kind) = field.split_once('.').unwrap_or((field, "weight"));
    let group = match base {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" | "q_norm" | "k_norm" => "self_attn.",
        "gate_proj" | "up_proj" | "down_proj" => "mlp.",
        _ => "",
    };
    format!("model.layers.{layer}.{group}{base}.{kind}")
}

/// The GGUF name of the per-layer tensor with [`layer_fields`] name `field`.
/// The number of heads whose rows a GGUF of `c` stores in llama.cpp's interleaved order for
/// the layer tensor `field` (`q_proj`, `k_proj` and their `.bias`), or `None` where the rows
/// are in HF order: only the llama architecture's q/k are permuted, and SmolLM3's and
/// Granite's, which llama.cpp converts as a Llama; Qwen's keep HF order.
fn permuted_heads(c: &LlamaConfig, field: &str) -> Option<usize> {
    if !matches!(c.arch, Arch::Llama | Arch::SmolLM3 | Arch::Granite) {
        return None;
    }
    match field {
        "q_proj" | "q_proj.bias" => Some(c.num_attention_heads),
        "k_proj" | "k_proj.bias" => Some(c.num_key_value_heads),
        _ => None,
    }
}

/// A matrix of `module`'s output rows (`values`, `cols` wide, HF order) in the row order a
/// GGUF of `c`'s architecture stores: q/k rows permuted where llama.cpp permutes them.
fn file_rows<'a>(c: &LlamaConfig, module: &str, values: &'a [f32], cols: usize) -> Result<std::borrow::Cow<'a, [f32]>> {
    Ok(match permuted_heads(c, module) {
        Some(nh) => std::borrow::Cow::Owned(permute_qk_rows(values, nh, c.head_dim, cols)?),
        None => std::borrow::Cow::Borrowed(values),
    })
}

/// `values` as the bytes of a tensor of element type `T`.
fn encoded<T: crate::dtype::Element>(values: &[f32]) -> Vec<u8> {
    let v: Vec<T> = values.iter().map(|&x| T::from_f32(x)).collect();
    bytemuck::cast_slice(&v).to_vec()
}

/// A copy of the GGUF `src` in which the linear weights that `replace(layer, module)` names
/// (`module` an HF name, `q_proj` ... `down_proj`) hold `w`'s values instead: `w` in HF layout,
/// as [`LlamaWeights::from_gguf_file`] read it from `src` (q/k rows are permuted back where the
/// architecture stores them permuted). Everything else — metadata, the other tensors and their
/// quantization, their order — is copied byte for byte. A replaced weight keeps its type when
/// it is F32, F16 or BF16 and becomes F16 otherwise (re-quantizing is left to llama.cpp's
/// `llama-quantize`). This is `wegeft merge`'s GGUF output.
pub fn gguf_with_linears(
    src: &gguf::GgufFile,
    w: &LlamaWeights,
    replace: impl Fn(usize, &str) -> bool,
) -> Result<gguf::GgufWriter> {
    use gguf::{GgmlType, GgufWriter};
    let mut out = GgufWriter::new();
    for (k, v) in src.metadata() {
        out.kv(k.clone(), v.clone());
    }
    let c = &w.config;
    // The GGUF name of every replaced weight, with its layer and module.
    let targets: std::collections::HashMap<String, (usize, &str)> = (0..w.layers.len())
        .flat_map(|l| LINEAR_MODULES.iter().map(move |&m| (l, m)))
        .filter(|&(l, m)| replace(l, m))
        .map(|(l, m)| (gguf_layer_name(l, m), (l, m)))
        .collect();
    for info in src.tensors() {
        let Some(&(l, module)) = targets.get(&info.name) else {
            out.tensor(info.name.clone(), &info.ne, info.ty, src.tensor_bytes(&info.name)?.to_vec())?;
            continue;
        };
        let t = w.layers[l].linear(module)?;
        let values = &*file_rows(c, module, &t.data, t.shape.last().copied().unwrap_or(0))?;
        if info.n_elements() != values.len() {
            return Err(src.error(format!(
                "tensor {:?} has {} elements, the merged {module} of layer {l} {}",
                info.name,
                info.n_elements(),
                values.len()
            )));
        }
        let (ty, bytes) = match info.ty {
            GgmlType::F32 => (GgmlType::F32, encoded::<f32>(values)),
            GgmlType::BF16 => (GgmlType::BF16, encoded::<half::bf16>(values)),
            _ => (GgmlType::F16, encoded::<half::f16>(values)),
        };
        out.tensor(info.name.clone(), &info.ne, ty, bytes)?;
    }
    Ok(out)
}

/// `lora` as a llama.cpp LoRA adapter for the GGUF model `src` (`llama-cli --lora FILE`,
/// `llama_adapter_lora_init`): `general.type = "adapter"`, `adapter.type = "lora"`, the
/// source's `general.architecture` (llama.cpp refuses an adapter of another architecture),
/// `adapter.lora.alpha = r` (llama.cpp scales by `alpha / r`: 1 here, as `B` holds WeGeFT's
/// scale), and for each site the f32 tensors `<weight>.lora_a` (ggml `ne = [d_in, r]`) and
/// `<weight>.lora_b` (`ne = [r, d_out]`), named after the source's weight (`blk.L.attn_q.weight`).
/// `B`'s rows are permuted as the source's q/k weights are. Each site's weight must be in
/// `src` with the site's shape: an adapter for another model is an error here, not in
/// llama.cpp.
pub fn gguf_lora(src: &gguf::GgufFile, c: &LlamaConfig, lora: &crate::adapter::lora::Lora) -> Result<gguf::GgufWriter> {
    use gguf::{GgmlType, GgufValue, GgufWriter};
    lora.check()?;
    let arch = src.get_str("general.architecture")?;
    let r = lora.rank;
    let mut out = GgufWriter::new();
    out.kv("general.architecture", GgufValue::String(arch.to_string()));
    out.kv("general.type", GgufValue::String("adapter".into()));
    out.kv("adapter.type", GgufValue::String("lora".into()));
    out.kv("adapter.lora.alpha", GgufValue::F32(r as f32));
    for s in &lora.sites {
        let module = s.module.name();
        let name = gguf_layer_name(s.layer, module);
        let info = src.tensor_info(&name)?;
        if info.ne.len() != 2 || info.ne[0] != s.d_in as u64 || info.ne[1] != s.d_out as u64 {
            return Err(src.error(format!(
                "tensor {name:?} has ne {:?}, the LoRA site {} is {} x {} (d_out x d_in)",
                info.ne,
                s.module.key(s.layer),
                s.d_out,
                s.d_in
            )));
        }
        let b = file_rows(c, module, &s.b, r)?;
        out.tensor(format!("{name}.lora_a"), &[s.d_in as u64, r as u64], GgmlType::F32, encoded::<f32>(&s.a))?;
        out.tensor(format!("{name}.lora_b"), &[r as u64, s.d_out as u64], GgmlType::F32, encoded::<f32>(&b))?;
    }
    Ok(out)
}

fn gguf_layer_name(layer: usize, field: &str) -> String {
    let (base, kind) = field.split_once('.').unwrap_or((field, "weight"));
    let g = match base {
        "q_proj" => "attn_q",
        "k_proj" => "attn_k",
        "v_proj" => "attn_v",
        "o_proj" => "attn_output",
        "gate_proj" => "ffn_gate",
        "up_proj" => "ffn_up",
        "down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "q_norm" => "attn_q_norm",
        "k_norm" => "attn_k_norm",
        other => other,
    };
    format!("blk.{layer}.{g}.{kind}")
}

/// The per-layer tensors of a model with config `c`, with their expected shapes: the seven
/// projections (HF field names), the two norms, then the biases the config has
/// (`q_proj.bias`, ...) and Qwen3's `q_norm`, `k_norm`.
pub fn layer_fields(c: &LlamaConfig) -> Vec<(&'static str, Vec<usize>)> {
    let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let mut v = vec![
        ("q_proj", vec![q, h]),
        ("k_proj", vec![kv, h]),
        ("v_proj", vec![kv, h]),
        ("o_proj", vec![h, q]),
        ("gate_proj", vec![i, h]),
        ("up_proj", vec![i, h]),
        ("down_proj", vec![h, i]),
        ("input_layernorm", vec![h]),
        ("post_attention_layernorm", vec![h]),
    ];
    const BIASES: [&str; 7] = [
        "q_proj.bias",
        "k_proj.bias",
        "v_proj.bias",
        "o_proj.bias",
        "gate_proj.bias",
        "up_proj.bias",
        "down_proj.bias",
    ];
    for m in 0..7 {
        if c.has_bias(m) {
            let d_out = v[m].1[0];
            v.push((BIASES[m], vec![d_out]));
        }
    }
    if c.qk_norm() {
        v.push(("q_norm", vec![c.head_dim]));
        v.push(("k_norm", vec![c.head_dim]));
    }
    v
}

/// Builds a [`LayerWeights`] from its tensors, named and ordered as [`layer_fields`] gives them.
pub(crate) fn layer_from_vec(v: Vec<(&'static str, Tensor)>) -> Result<LayerWeights> {
    let n = v.len();
    let mut it = v.into_iter();
    let mut base = Vec::with_capacity(9);
    for _ in 0..9 {
        base.push(it.next().ok_or_else(|| Error::invalid("layer", format!("expected at least 9 tensors, got {n}")))?.1);
    }
    let [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, input_layernorm, post_attention_layernorm]: [Tensor; 9] =
        base.try_into().map_err(|_| Error::invalid("layer", "expected 9 tensors"))?;
    let mut lw = LayerWeights {
        q_proj,
        k_proj,
        v_proj,
        o_proj,
        gate_proj,
        up_proj,
        down_proj,
        input_layernorm,
        post_attention_layernorm,
        biases: Default::default(),
        q_norm: None,
        k_norm: None,
    };
    for (field, t) in it {
        match field {
            "q_norm" => lw.q_norm = Some(t),
            "k_norm" => lw.k_norm = Some(t),
            f => {
                let m = f
                    .strip_suffix(".bias")
                    .and_then(|m| LINEAR_MODULES.iter().position(|x| *x == m))
                    .ok_or_else(|| Error::invalid("layer", format!("unknown layer tensor {f:?}")))?;
                lw.biases[m] = Some(t);
            }
        }
    }
    Ok(lw)
}

/// Reorders the rows of a GGUF `attn_q`/`attn_k` matrix (`n_heads * head_dim` rows of `cols`)
/// back to HF order: HF row `h*head_dim + half*head_dim/2 + j` = GGUF row
/// `h*head_dim + 2j + half`, for `half` in {0, 1}, `j < head_dim/2`.
pub fn unpermute_qk_rows(data: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Result<Vec<f32>> {
    reorder_qk_rows(data, n_heads, head_dim, cols, false)
}

/// The inverse of [`unpermute_qk_rows`]: HF order to llama.cpp's interleaved order.
pub fn permute_qk_rows(data: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Result<Vec<f32>> {
    reorder_qk_rows(data, n_heads, head_dim, cols, true)
}

fn reorder_qk_rows(
    data: &[f32],
    n_heads: usize,
    head_dim: usize,
    cols: usize,
    to_gguf: bool,
) -> Result<Vec<f32>> {
    if head_dim % 2 != 0 || head_dim == 0 {
        return Err(Error::invalid("head_dim", format!("must be even and positive, got {head_dim}")));
    }
    let need = n_heads.checked_mul(head_dim).and_then(|r| r.checked_mul(cols));
    if need != Some(data.len()) {
        return Err(Error::invalid(
            "data",
            format!(
                "{n_heads} heads x {head_dim} rows x {cols} cols need {need:?} values, got {}",
                data.len()
            ),
        ));
    }
    let half_dim = head_dim / 2;
    let mut out = vec![0.0f32; data.len()];
    for h in 0..n_heads {
        for half in 0..2 {
            for j in 0..half_dim {
                let hf = h * head_dim + half * half_dim + j;
                let gg = h * head_dim + 2 * j + half;
                let (src, dst) = if to_gguf { (hf, gg) } else { (gg, hf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

impl LlamaWeights {
    /// Loads `path`: a directory (or a `*.safetensors` / `*.json` file in one) is read as an HF
    /// safetensors checkpoint ([`LlamaWeights::from_safetensors_dir`]), any other file as GGUF
    /// ([`LlamaWeights::from_gguf`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let is_hf_file = path.extension().is_some_and(|x| x == "safetensors" || x == "json");
        if meta.is_dir() {
            Self::from_safetensors_dir(path)
        } else if is_hf_file {
            // `model.safetensors` or `config.json` of an HF checkpoint: load its directory.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            Self::from_safetensors_dir(dir)
        } else {
            Self::from_gguf(path)
        }
    }

    /// Loads and dequantizes a GGUF file (see the module docs for the name mapping).
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let g = GgufFile::open(path)?;
        Self::from_gguf_file(&g)
    }

    /// Loads the weights from an opened GGUF file. Every tensor's shape is checked against the
    /// config; q/k rows are un-permuted; a tensor the model does not use is an error.
    pub fn from_gguf_file(g: &GgufFile) -> Result<Self> {
        let config = LlamaConfig::from_gguf(g)?;
        let mut used = std::collections::HashSet::new();
        let mut load = |name: String, expected: &[usize]| -> Result<Tensor> {
            let info = g.tensor_info(&name)?;
            let shape = info.shape();
            if shape != expected {
                return Err(g.error(format!(
                    "tensor {name:?}: shape {shape:?} (ggml ne {:?}) disagrees with the config, expected {expected:?}",
                    info.ne
                )));
            }
            let (shape, data) = g.tensor_f32(&name)?;
            used.insert(name);
            Ok(Tensor { shape, data })
        };
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = load("token_embd.weight".into(), &[v, h])?;
        let mut layers = Vec::new(); // no capacity from an untrusted count
        for l in 0..config.num_hidden_layers {
            let mut ts = Vec::with_capacity(9);
            for (field, shape) in layer_fields(&config) {
                let name = gguf_layer_name(l, field);
                let mut t = load(name.clone(), &shape)?;
                if let Some(nh) = permuted_heads(&config, field) {
                    let cols = if field.ends_with(".bias") { 1 } else { h };
                    t.data = unpermute_qk_rows(&t.data, nh, config.head_dim, cols)
                        .map_err(|e| g.error(format!("tensor {name:?}: {e}")))?;
                }
                ts.push((field, t));
            }
            layers.push(layer_from_vec(ts)?);
        }
        let norm = load("output_norm.weight".into(), &[h])?;
        let lm_head =
            if config.tie_word_embeddings { None } else { Some(load("output.weight".into(), &[v, h])?) };
        if matches!(config.rope_scaling, crate::rope::RopeScaling::FreqFactors(_)) {
            used.insert("rope_freqs.weight".to_string()); // read by LlamaConfig::from_gguf
        }
        let extra: Vec<&str> =
            g.tensors().iter().map(|t| t.name.as_str()).filter(|n| !used.contains(*n)).take(10).collect();
        if !extra.is_empty() {
            return Err(g.error(format!("tensors the Llama model does not use: {extra:?}")));
        }
        Ok(LlamaWeights { config, embed_tokens, layers, norm, lm_head })
    }

    /// The output projection: `lm_head`, or `embed_tokens` when tied.
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Every tensor with its HF safetensors name, in a fixed order (embeddings, layers in
    /// order, final norm, `lm_head` when untied).
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        let fields = layer_fields(&self.config);
        for (l, lw) in self.layers.iter().enumerate() {
            for (field, _) in &fields {
                if let Some(t) = lw.field(field) {
                    v.push((hf_layer_name(l, field), t));
                }
            }
        }
        v.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(t) = &self.lm_head {
            v.push(("lm_head.weight".to_string(), t));
        }
        v
    }

    /// Checks every tensor's shape against the config (and the layer count); the error names
    /// the tensor. Call after editing the weights by hand.
    pub fn validate(&self) -> Result<()> {
        let c = &self.config;
        c.validate()?;
        if self.layers.len() != c.num_hidden_layers {
            return Err(Error::invalid(
                "layers",
                format!("{} layers, the config says {}", self.layers.len(), c.num_hidden_layers),
            ));
        }
        if self.lm_head.is_some() == c.tie_word_embeddings {
            return Err(Error::invalid("lm_head", "present exactly when tie_word_embeddings is false"));
        }
        let fields = layer_fields(c);
        for (l, lw) in self.layers.iter().enumerate() {
            // Exactly the config's biases and norms: a missing one or one too many.
            let has = |f: &str| fields.iter().any(|(x, _)| *x == f);
            let extra = lw.biases.iter().enumerate().find(|(m, b)| b.is_some() != c.has_bias(*m));
            if let Some((m, b)) = extra {
                return Err(Error::invalid(
                    "weights",
                    format!(
                        "layer {l}: {} has {} bias, the config says {}",
                        LINEAR_MODULES[m],
                        if b.is_some() { "a" } else { "no" },
                        if c.has_bias(m) { "it has one" } else { "none" }
                    ),
                ));
            }
            for (f, t) in [("q_norm", &lw.q_norm), ("k_norm", &lw.k_norm)] {
                if t.is_some() != has(f) {
                    return Err(Error::invalid(
                        "weights",
                        format!("layer {l}: {f} is {} but the config's arch is {:?}", if t.is_some() { "present" } else { "absent" }, c.arch),
                    ));
                }
            }
        }
        let mut expected = vec![vec![c.vocab_size, c.hidden_size]];
        for _ in 0..c.num_hidden_layers {
            expected.extend(fields.iter().map(|(_, s)| s.clone()));
        }
        expected.push(vec![c.hidden_size]);
        if self.lm_head.is_some() {
            expected.push(vec![c.vocab_size, c.hidden_size]);
        }
        for ((name, t), want) in self.named_tensors().into_iter().zip(expected) {
            if t.shape != want || t.data.len() != want.iter().product::<usize>() {
                return Err(Error::invalid(
                    "weights",
                    format!("{name}: shape {:?} with {} values, expected {want:?}", t.shape, t.data.len()),
                ));
            }
        }
        Ok(())
    }
}

/// Writes `path` atomically: the content goes to `path.tmp`, is fsynced, and is renamed over
/// `path`; then the directory is fsynced. On error the temporary file is removed.
pub(crate) fn write_atomic(path: &Path, write: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(path);
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// fsyncs the directory holding `path` (best effort: not every platform allows it).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}
