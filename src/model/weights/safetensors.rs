//! Hugging Face checkpoints: a directory with `config.json` and `*.safetensors` (one file, or
//! shards listed by `model.safetensors.index.json`), tensors in F32, F16, BF16 or F64, read
//! into [`LlamaWeights`]; and [`LlamaWeights::save_safetensors_hf`], which writes
//! `model.safetensors` (f32, HF names) and `config.json` atomically.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::{hf_layer_name, layer_fields, layer_from_vec, write_atomic, LlamaWeights, Tensor};
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;

/// The name of the single-file checkpoint this crate writes.
pub const MODEL_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The safetensors files of a checkpoint directory: the shards named by the index when there is
/// one, else every `*.safetensors` file in it (sorted).
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&index, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(&index, "no \"weight_map\" object"))?;
        let mut files = BTreeSet::new();
        for (name, f) in map {
            let f = f
                .as_str()
                .ok_or_else(|| Error::format(&index, format!("weight_map[{name:?}] is not a file name")))?;
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(Error::format(
                    &index,
                    format!("weight_map[{name:?}] = {f:?} is not a plain file name"),
                ));
            }
            files.insert(f.to_string());
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let p = e.path();
        if p.extension().is_some_and(|x| x == "safetensors") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::format(dir, "no *.safetensors file in the directory"));
    }
    Ok(files)
}

/// Converts a safetensors view to f32 values.
fn view_to_f32(path: &Path, name: &str, v: &TensorView<'_>) -> Result<Vec<f32>> {
    let b = v.data();
    Ok(match v.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(Error::format(
                path,
                format!("tensor {name:?}: dtype {other:?} is not supported (F32, F16, BF16, F64)"),
            ))
        }
    })
}

impl LlamaWeights {
    /// Loads an HF Llama checkpoint directory: `config.json` plus `model.safetensors`, or the
    /// shards of `model.safetensors.index.json`, or every `*.safetensors` file. Tensors are
    /// converted to f32 and their shapes checked against the config; with tied embeddings a
    /// `lm_head.weight` in the files is ignored. A tensor the model does not use is an error
    /// (except `rotary_emb.inv_freq` buffers).
    pub fn from_safetensors_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_hf_json(dir.join("config.json"))?;
        let files = checkpoint_files(dir)?;
        let mut maps = Vec::with_capacity(files.len());
        for f in &files {
            let file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
            // SAFETY: read-only map; the file must not change while it is loaded.
            let m = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(f, e))?;
            maps.push(m);
        }
        let mut parsed = Vec::with_capacity(files.len());
        for (f, m) in files.iter().zip(&maps) {
            let st = SafeTensors::deserialize(m)
                .map_err(|e| Error::format(f, format!("invalid safetensors: {e}")))?;
            parsed.push(st);
        }
        // name -> file index
        let mut where_: HashMap<String, usize> = HashMap::new();
        for (i, st) in parsed.iter().enumerate() {
            for n in st.names() {
                if let Some(j) = where_.insert(n.to_string(), i) {
                    return Err(Error::format(
                        &files[i],
                        format!("tensor {n:?} is also in {}", files[j].display()),
                    ));
                }
            }
        }
        let mut used = BTreeSet::new();
        let mut load = |name: String, expected: &[usize]| -> Result<Tensor> {
            let &i = where_
                .get(&name)
                .ok_or_else(|| Error::format(dir, format!("missing tensor {name:?} in {files:?}")))?;
            let f = &files[i];
            let v = parsed[i].tensor(&name).map_err(|e| Error::format(f, format!("tensor {name:?}: {e}")))?;
            if v.shape() != expected {
                return Err(Error::format(
                    f,
                    format!(
                        "tensor {name:?}: shape {:?} disagrees with config.json, expected {expected:?}",
                        v.shape()
                    ),
                ));
            }
            let data = view_to_f32(f, &name, &v)?;
            used.insert(name);
            Ok(Tensor { shape: expected.to_vec(), data })
        };
        let (vs, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = load("model.embed_tokens.weight".into(), &[vs, h])?;
        let mut layers = Vec::new(); // no capacity from an untrusted count
        for l in 0..config.num_hidden_layers {
            let mut ts = Vec::with_capacity(9);
            for (field, shape) in layer_fields(&config) {
                ts.push((field, load(hf_layer_name(l, field), &shape)?));
            }
            layers.push(layer_from_vec(ts)?);
        }
        let norm = load("model.norm.weight".into(), &[h])?;
        let lm_head = if config.tie_word_embeddings {
            used.insert("lm_head.weight".to_string());
            None
        } else {
            Some(load("lm_head.weight".into(), &[vs, h])?)
        };
        let extra: Vec<&String> = where_
            .keys()
            .filter(|n| !used.contains(*n) && !n.ends_with("rotary_emb.inv_freq"))
            .take(10)
            .collect();
        if !extra.is_empty() {
            return Err(Error::format(dir, format!("tensors the Llama model does not use: {extra:?}")));
        }
        Ok(LlamaWeights { config, embed_tokens, layers, norm, lm_head })
    }

    /// Writes the weights as an HF checkpoint into `dir` (created if needed):
    /// `model.safetensors` (every tensor f32, HF names, metadata `format = pt`; no
    /// `lm_head.weight` when tied) and `config.json` ([`LlamaConfig::to_hf_json`]). Each file
    /// is written to a temporary file, fsynced and renamed, so a crash leaves either the old
    /// or the new file. Refuses a directory holding a sharded checkpoint or other
    /// `*.safetensors` files, which would be mixed with the new one when loading.
    pub fn save_safetensors_hf(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        self.validate()?;
        // Before anything is written: a config that config.json cannot hold is refused here.
        let cfg = serde_json::to_string_pretty(&self.config.to_hf_json()?)
            .map_err(|e| Error::invalid("config", e.to_string()))?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if dir.join(INDEX_FILE).exists() {
            return Err(Error::invalid(
                "dir",
                format!(
                    "{} holds a sharded checkpoint ({INDEX_FILE}); write into an empty directory",
                    dir.display()
                ),
            ));
        }
        let others: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && !p.ends_with(MODEL_FILE))
            .collect();
        if !others.is_empty() {
            return Err(Error::invalid(
                "dir",
                format!(
                    "{} holds other safetensors files {others:?}; write into an empty directory",
                    dir.display()
                ),
            ));
        }

        // Stream the file (no second in-memory copy of the model): an 8-byte header length,
        // the JSON header padded with spaces to a multiple of 8, then the tensors back to back.
        let named = self.named_tensors();
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
        let mut offset = 0usize;
        for (name, t) in &named {
            let end = offset + t.data.len() * 4;
            header.insert(
                name.clone(),
                serde_json::json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [offset, end] }),
            );
            offset = end;
        }
        let mut header = serde_json::to_vec(&serde_json::Value::Object(header))
            .map_err(|e| Error::invalid("weights", e.to_string()))?;
        header.resize(header.len().div_ceil(8) * 8, b' ');
        let model_path = dir.join(MODEL_FILE);
        write_atomic(&model_path, |f| {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.write_all(&header)?;
            for (_, t) in &named {
                w.write_all(bytemuck::cast_slice(&t.data))?;
            }
            w.flush()
        })?;
        write_atomic(&dir.join("config.json"), |f| f.write_all(cfg.as_bytes()))
    }
}
