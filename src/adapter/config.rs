//! Adapter configuration: rank, scale, target modules, sharing groups, initialisation,
//! weight dropout, seed — and the model dimensions an adapter is built for.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// A Llama linear layer an adapter can target. The order is the order of the modules in a
/// decoder layer (`named_modules()` order in transformers), which decides which layer of a
/// shared group "owns" the pair in the PEFT layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Module {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Module {
    /// All seven, in decoder-layer order.
    pub const ALL: [Module; 7] =
        [Module::QProj, Module::KProj, Module::VProj, Module::OProj, Module::GateProj, Module::UpProj, Module::DownProj];

    /// The transformers attribute name (`q_proj`, ..., `down_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Module::QProj => "q_proj",
            Module::KProj => "k_proj",
            Module::VProj => "v_proj",
            Module::OProj => "o_proj",
            Module::GateProj => "gate_proj",
            Module::UpProj => "up_proj",
            Module::DownProj => "down_proj",
        }
    }
    /// The submodule holding it in a decoder layer: `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            Module::QProj | Module::KProj | Module::VProj | Module::OProj => "self_attn",
            _ => "mlp",
        }
    }
    /// Index in [`Module::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
    /// Parses a name as written by [`Module::name`].
    pub fn parse(s: &str) -> Result<Module> {
        Module::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::invalid("module", format!("unknown module {s:?} (expected one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")))
    }
    /// The transformers module path inside a Llama model: `model.layers.{layer}.{parent}.{name}`.
    pub fn key(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.parent(), self.name())
    }
}

impl std::fmt::Display for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The dimensions of the model an adapter is built for. WeGeFT's `phi`/`psi` live in the
/// *input* space of each layer: `d_in` is `hidden` for q, k, v, gate and up, `intermediate` for
/// `down_proj`, and the attention's width (`heads * head_dim`, which is `hidden` except in
/// models such as Qwen3 whose heads are wider) for `o_proj`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDims {
    pub n_layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    /// `o_proj`'s input width, `heads * head_dim` (`hidden` when absent from a file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_width: Option<usize>,
}

impl ModelDims {
    /// Dimensions of a model whose attention is `hidden` wide (see [`ModelDims::with_attn_width`]).
    pub fn new(n_layers: usize, hidden: usize, intermediate: usize) -> Result<Self> {
        for (what, v) in [("n_layers", n_layers), ("hidden", hidden), ("intermediate", intermediate)] {
            if v == 0 {
                return Err(Error::ZeroDim { what });
            }
        }
        Ok(ModelDims { n_layers, hidden, intermediate, attn_width: None })
    }
    /// The same dimensions with an attention of `width = heads * head_dim` (`o_proj`'s input).
    pub fn with_attn_width(mut self, width: usize) -> Result<Self> {
        if width == 0 {
            return Err(Error::ZeroDim { what: "attn_width" });
        }
        self.attn_width = (width != self.hidden).then_some(width);
        Ok(self)
    }
    /// The input width of `module`.
    pub fn d_in(&self, module: Module) -> usize {
        match module {
            Module::DownProj => self.intermediate,
            Module::OProj => self.attn_width.unwrap_or(self.hidden),
            _ => self.hidden,
        }
    }
}

/// One explicit sharing group: every targeted `(layer, module)` with `module` in `modules` and
/// `layer` in `layers` (all layers when `None`) uses one pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareGroup {
    pub modules: Vec<Module>,
    pub layers: Option<Vec<usize>>,
}

/// How `(layer, module)` sites share pairs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharing {
    /// One pair per module type across all layers (the method's default, the official code).
    PerModule,
    /// Every `(layer, module)` its own pair.
    None,
    /// Explicit groups, as the PEFT fork's `tied_modules`: a site takes the pair of the first
    /// group it belongs to; a site in no group gets its own pair. Modules of one group must have
    /// the same `d_in`.
    Groups(Vec<ShareGroup>),
}

/// Initialisation of a fresh adapter. `U(d) = uniform(-1/sqrt(d), 1/sqrt(d))`, which is
/// `nn.Linear`'s default `kaiming_uniform_(a=sqrt(5))` for a weight with fan-in `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// Official GIFT code: `in_proj.weight = phi^T` ~ `U(d_in)`, `out_proj.weight = psi^T` = 0.
    Gift,
    /// PEFT fork: `wegeft_phi.weight = phi^T` = 0, `wegeft_psi.weight = psi` ~ `U(d_in)`.
    Peft,
}

/// Everything that defines an adapter besides its values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// `r`, the width of `phi` / height of `psi`.
    pub rank: usize,
    /// `None`: scale 1 (the official GIFT wrapper); `Some(alpha)`: scale `alpha / rank` (the
    /// PEFT fork's `wegeft_alpha`).
    pub alpha: Option<f32>,
    /// Targeted module types (no duplicates), in any order.
    pub targets: Vec<Module>,
    pub sharing: Sharing,
    pub init: Init,
    /// Dropout probability on `W` inside the adapter path (the PEFT fork's `wegeft_dropout`);
    /// applied by the layer during training, 0 = none.
    pub dropout: f32,
    /// Seed of the initialisation (and of dropout masks).
    pub seed: u64,
}

impl AdapterConfig {
    /// A configuration with the defaults: scale 1, one pair per module, GIFT init, no dropout,
    /// seed 0.
    pub fn new(rank: usize, targets: Vec<Module>) -> Result<Self> {
        let c = AdapterConfig { rank, alpha: None, targets, sharing: Sharing::PerModule, init: Init::Gift, dropout: 0.0, seed: 0 };
        c.validate()?;
        Ok(c)
    }

    /// `s = alpha / rank`, or 1 without alpha.
    pub fn scale(&self) -> f32 {
        match self.alpha {
            Some(a) => a / self.rank as f32,
            None => 1.0,
        }
    }

    /// Checks the fields on their own (see [`AdapterConfig::validate_for`] for the model).
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::ZeroDim { what: "rank" });
        }
        if self.targets.is_empty() {
            return Err(Error::invalid("targets", "no target module"));
        }
        for (i, m) in self.targets.iter().enumerate() {
            if self.targets[..i].contains(m) {
                return Err(Error::invalid("targets", format!("{m} is listed twice")));
            }
        }
        if let Some(a) = self.alpha {
            if !a.is_finite() || a == 0.0 {
                return Err(Error::invalid("alpha", format!("must be finite and non-zero, got {a}")));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid("dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        if let Sharing::Groups(groups) = &self.sharing {
            for (gi, g) in groups.iter().enumerate() {
                if g.modules.is_empty() {
                    return Err(Error::invalid("sharing", format!("group {gi} has no module")));
                }
                if let Some(l) = &g.layers {
                    if l.is_empty() {
                        return Err(Error::invalid("sharing", format!("group {gi} has an empty layer list")));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks the configuration against a model: layers of explicit groups exist, and the
    /// modules of a group have one `d_in`.
    pub fn validate_for(&self, dims: &ModelDims) -> Result<()> {
        self.validate()?;
        if let Sharing::Groups(groups) = &self.sharing {
            for (gi, g) in groups.iter().enumerate() {
                if let Some(&l) = g.layers.as_ref().and_then(|ls| ls.iter().find(|&&l| l >= dims.n_layers)) {
                    return Err(Error::invalid("sharing", format!("group {gi}: layer {l} >= n_layers {}", dims.n_layers)));
                }
                let d0 = dims.d_in(g.modules[0]);
                if let Some(m) = g.modules.iter().find(|&&m| dims.d_in(m) != d0) {
                    return Err(Error::invalid(
                        "sharing",
                        format!("group {gi}: {} (d_in {d0}) and {m} (d_in {}) cannot share a pair", g.modules[0], dims.d_in(*m)),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The group index of a site under explicit groups (first match), if any.
    pub(crate) fn group_of(&self, layer: usize, module: Module) -> Option<usize> {
        match &self.sharing {
            Sharing::Groups(groups) => groups
                .iter()
                .position(|g| g.modules.contains(&module) && g.layers.as_ref().map_or(true, |ls| ls.contains(&layer))),
            _ => None,
        }
    }
}
