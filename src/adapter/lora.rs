//! A WeGeFT adapter written as a standard LoRA adapter, for the tools that serve LoRA.
//!
//! At every adapted site (layer `L`, module `m`) with frozen weight `W` (`d_out x d_in`),
//!
//! ```text
//! W' = W + s W phi psi = W + B A        A = psi (r x d_in),   B = s W phi (d_out x r)
//! ```
//!
//! a rank-`r` LoRA update, exact up to the rounding of `B`. `A` is the pair's `psi`, the same
//! at every site sharing the pair; `B` depends on that layer's `W`, so the LoRA files hold one
//! `B` per site (`d_out x r` numbers where WeGeFT trains none). Training stays WeGeFT (a pair
//! per module type, no per-layer parameters); serving can then use any LoRA runtime — PEFT,
//! vLLM's and SGLang's multi-LoRA batching, llama.cpp's `--lora` — unchanged. `W` is the
//! weight as the model file holds it (dequantized where it is quantized): a LoRA served on
//! that same file gives this crate's adapter model.
//!
//! Two layouts:
//! - PEFT's LoRA ([`save_peft_lora`]): `adapter_config.json` (`peft_type` `"LORA"`, `r`,
//!   `lora_alpha = r` so that PEFT's scale `lora_alpha / r` is 1, `target_modules`) and
//!   `adapter_model.safetensors` with `base_model.model.<site>.lora_A.weight` (`r x d_in`) and
//!   `.lora_B.weight` (`d_out x r`), f32.
//! - llama.cpp's GGUF LoRA: [`crate::model::weights::gguf_lora`].
//!
//! [`crate::model::llama::HostAdapter::to_lora`] makes a [`Lora`] from an adapter and the
//! model's weights.

use std::collections::BTreeMap;
use std::path::Path;

use super::config::Module;
use super::io::{f32_bytes, re_escape, write_peft_dir, Owned};
use crate::error::{Error, Result};

/// The LoRA factors of one adapted site: `W' = W + B A`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSite {
    pub layer: usize,
    pub module: Module,
    pub d_in: usize,
    pub d_out: usize,
    /// `r x d_in`, row-major (the pair's `psi`).
    pub a: Vec<f32>,
    /// `d_out x r`, row-major (`s W phi`).
    pub b: Vec<f32>,
}

/// A LoRA adapter (scale 1): every adapted site, in model order (layers ascending, modules
/// in decoder order).
#[derive(Clone, Debug, PartialEq)]
pub struct Lora {
    pub rank: usize,
    pub n_layers: usize,
    pub sites: Vec<LoraSite>,
}

impl Lora {
    /// Checks every site's factor lengths against its dims and the rank, and that no site
    /// appears twice or lies beyond the model.
    pub fn check(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::ZeroDim { what: "rank" });
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.sites {
            if s.layer >= self.n_layers {
                return Err(Error::invalid("lora site", format!("layer {} >= n_layers {}", s.layer, self.n_layers)));
            }
            if !seen.insert((s.layer, s.module)) {
                return Err(Error::invalid("lora site", format!("{} appears twice", s.module.key(s.layer))));
            }
            if s.a.len() != self.rank * s.d_in {
                return Err(Error::Shape { arg: "lora A", expected: (self.rank, s.d_in), got: (s.a.len() / s.d_in.max(1), s.d_in) });
            }
            if s.b.len() != s.d_out * self.rank {
                return Err(Error::Shape { arg: "lora B", expected: (s.d_out, self.rank), got: (s.b.len() / self.rank, self.rank) });
            }
        }
        Ok(())
    }

    /// The targeted module types, in decoder order.
    pub fn modules(&self) -> Vec<Module> {
        Module::ALL.into_iter().filter(|m| self.sites.iter().any(|s| s.module == *m)).collect()
    }

    /// PEFT's `target_modules`: the module names when every layer has the same adapted
    /// modules, otherwise one pattern that `re.fullmatch`es exactly the adapted sites' keys.
    fn target_modules(&self) -> serde_json::Value {
        let modules = self.modules();
        let sites: std::collections::HashSet<(usize, Module)> = self.sites.iter().map(|s| (s.layer, s.module)).collect();
        let uniform = (0..self.n_layers).all(|l| modules.iter().all(|m| sites.contains(&(l, *m))));
        if uniform {
            serde_json::json!(modules.iter().map(|m| m.name()).collect::<Vec<_>>())
        } else {
            let keys: Vec<String> = self.sites.iter().map(|s| re_escape(&s.module.key(s.layer))).collect();
            serde_json::json!(format!("(?:{})", keys.join("|")))
        }
    }
}

/// The PEFT key of a LoRA factor (`"A"` or `"B"`) of a site.
pub fn peft_lora_key(layer: usize, m: Module, factor: &str) -> String {
    format!("base_model.model.{}.lora_{factor}.weight", m.key(layer))
}

/// Writes `lora` as a PEFT LoRA adapter directory `dir` (created if needed):
/// `adapter_config.json` and `adapter_model.safetensors` (f32), each atomically. `lora_alpha`
/// equals `r`: PEFT's scale `lora_alpha / r` is 1, as `B` already holds WeGeFT's scale.
pub fn save_peft_lora(lora: &Lora, dir: &Path) -> Result<()> {
    lora.check()?;
    let r = lora.rank;
    let mut t = BTreeMap::new();
    for s in &lora.sites {
        t.insert(peft_lora_key(s.layer, s.module, "A"), Owned { shape: vec![r, s.d_in], data: f32_bytes(&s.a) });
        t.insert(peft_lora_key(s.layer, s.module, "B"), Owned { shape: vec![s.d_out, r], data: f32_bytes(&s.b) });
    }
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "target_modules": lora.target_modules(),
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
    });
    write_peft_dir(dir, &t, None, cfg)
}
