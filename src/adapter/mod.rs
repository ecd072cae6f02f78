//! The WeGeFT adapter of a model: its configuration ([`config`]), its parameters (this module:
//! [`Adapter`], [`Pair`]), their initialisation ([`init`]) and files ([`io`]: the official GIFT
//! layout and the PEFT fork's layout; [`lora`]: the same update as a standard LoRA adapter, for
//! LoRA runtimes).
//!
//! Each [`Pair`] holds `phi` (`d_in x r`) and `psi` (`r x d_in`) in f32, row-major, and the list
//! of `(layer, module)` sites that use it; the adapter maps every site to its pair, so a layer
//! asks [`Adapter::pair`] for its matrices and gradients of a shared pair sum over its sites.

pub mod config;
pub mod init;
pub mod io;
pub mod lora;

pub use config::{AdapterConfig, Init, ModelDims, Module, ShareGroup, Sharing};

use crate::error::{Error, Result};

/// One trainable pair and the sites that share it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    /// A stable name: the module name for per-module sharing (`q_proj`), `layers.{l}.{module}`
    /// without sharing, the module names joined by `-` (and `@l0,l1,..` for a layer subset) for
    /// explicit groups.
    pub name: String,
    pub d_in: usize,
    pub rank: usize,
    /// `d_in x rank`, row-major (`= in_proj.weight^T` of the official code).
    pub phi: Vec<f32>,
    /// `rank x d_in`, row-major (`= out_proj.weight^T` of the official code).
    pub psi: Vec<f32>,
    /// The `(layer, module)` sites using this pair, in model order; the first one "owns" it.
    pub sites: Vec<(usize, Module)>,
}

/// The adapter of one model: configuration, dimensions, pairs, and the site -> pair map.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub dims: ModelDims,
    pairs: Vec<Pair>,
    index: SiteIndex,
}

/// One pair of a layout: `(name, d_in, sites)`.
pub(crate) type PairLayout = (String, usize, Vec<(usize, Module)>);
/// `index[layer][module.index()]` -> pair.
pub(crate) type SiteIndex = Vec<[Option<usize>; 7]>;

/// The pair layout (names, `d_in`, sites) a configuration gives on a model, pairs in order of
/// their first site (layers ascending, modules in decoder order).
pub(crate) fn layout(config: &AdapterConfig, dims: &ModelDims) -> Result<(Vec<PairLayout>, SiteIndex)> {
    config.validate_for(dims)?;
    let mut pairs: Vec<PairLayout> = Vec::new();
    let mut index = vec![[None; 7]; dims.n_layers];
    let mut by_key: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for layer in 0..dims.n_layers {
        for m in Module::ALL {
            if !config.targets.contains(&m) {
                continue;
            }
            let name = match &config.sharing {
                Sharing::PerModule => m.name().to_string(),
                Sharing::None => format!("layers.{layer}.{m}"),
                Sharing::Groups(groups) => match config.group_of(layer, m) {
                    Some(gi) => {
                        let g = &groups[gi];
                        let mut n = g.modules.iter().map(|m| m.name()).collect::<Vec<_>>().join("-");
                        if let Some(ls) = &g.layers {
                            n.push('@');
                            n.push_str(&ls.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","));
                        }
                        n
                    }
                    None => format!("layers.{layer}.{m}"),
                },
            };
            let k = *by_key.entry(name.clone()).or_insert_with(|| {
                pairs.push((name, dims.d_in(m), Vec::new()));
                pairs.len() - 1
            });
            pairs[k].2.push((layer, m));
            index[layer][m.index()] = Some(k);
        }
    }
    Ok((pairs, index))
}

impl Adapter {
    /// A freshly initialised adapter (see [`Init`]; deterministic for `config.seed`).
    pub fn new(config: AdapterConfig, dims: ModelDims) -> Result<Self> {
        let (lay, index) = layout(&config, &dims)?;
        let mut rng = crate::rng::Rng::new(config.seed);
        let pairs = lay
            .into_iter()
            .map(|(name, d_in, sites)| {
                let (phi, psi) = init::init_pair(config.init, d_in, config.rank, &mut rng)?;
                Ok(Pair { name, d_in, rank: config.rank, phi, psi, sites })
            })
            .collect::<Result<_>>()?;
        Ok(Adapter { config, dims, pairs, index })
    }

    /// [`Adapter::new`] with a small nonzero `psi` (`((i % 7) - 3) * 1e-3` at element `i` of
    /// each pair), for benchmarks: from the zero init of `psi`, C = W phi psi's products would
    /// multiply zeros, and a step would not do the work of a trained adapter.
    pub fn for_benchmark(config: AdapterConfig, dims: ModelDims) -> Result<Self> {
        let mut a = Self::new(config, dims)?;
        for p in &mut a.pairs {
            p.psi.iter_mut().enumerate().for_each(|(i, v)| *v = ((i % 7) as f32 - 3.0) * 1e-3);
        }
        Ok(a)
    }

    /// An adapter with the given values: `values[k] = (phi, psi)` for pair `k` of the layout of
    /// `config` (see [`Adapter::pair_names`]); each length is checked.
    pub fn from_values(config: AdapterConfig, dims: ModelDims, values: Vec<(Vec<f32>, Vec<f32>)>) -> Result<Self> {
        let (lay, index) = layout(&config, &dims)?;
        if values.len() != lay.len() {
            return Err(Error::Len { arg: "values", expected: lay.len(), got: values.len() });
        }
        let r = config.rank;
        let mut pairs = Vec::with_capacity(lay.len());
        for ((name, d_in, sites), (phi, psi)) in lay.into_iter().zip(values) {
            if phi.len() != d_in * r {
                return Err(Error::Shape { arg: "phi", expected: (d_in, r), got: (phi.len() / r, r) });
            }
            if psi.len() != d_in * r {
                return Err(Error::Shape { arg: "psi", expected: (r, d_in), got: (r, psi.len() / r) });
            }
            pairs.push(Pair { name, d_in, rank: r, phi, psi, sites });
        }
        Ok(Adapter { config, dims, pairs, index })
    }

    /// The names of the pairs a configuration gives on a model, in pair order.
    pub fn pair_names(config: &AdapterConfig, dims: &ModelDims) -> Result<Vec<String>> {
        Ok(layout(config, dims)?.0.into_iter().map(|p| p.0).collect())
    }

    /// `s = alpha / r` or 1.
    pub fn scale(&self) -> f32 {
        self.config.scale()
    }
    pub fn rank(&self) -> usize {
        self.config.rank
    }
    pub fn pairs(&self) -> &[Pair] {
        &self.pairs
    }
    /// `(phi, psi)` of pair `k` as mutable slices (their lengths are fixed).
    pub fn pair_values_mut(&mut self, k: usize) -> Result<(&mut [f32], &mut [f32])> {
        let n = self.pairs.len();
        let p = self.pairs.get_mut(k).ok_or_else(|| Error::invalid("k", format!("pair {k} of {n}")))?;
        Ok((p.phi.as_mut_slice(), p.psi.as_mut_slice()))
    }
    /// The pair index of a site, `None` where the module is not targeted. A layer beyond the
    /// model is an error.
    pub fn pair_index(&self, layer: usize, module: Module) -> Result<Option<usize>> {
        let row = self.index.get(layer).ok_or_else(|| {
            Error::invalid("layer", format!("layer {layer} >= n_layers {}", self.dims.n_layers))
        })?;
        Ok(row[module.index()])
    }
    /// The pair of a site, `None` where the module is not targeted.
    pub fn pair(&self, layer: usize, module: Module) -> Result<Option<&Pair>> {
        Ok(self.pair_index(layer, module)?.map(|k| &self.pairs[k]))
    }
    /// Trainable parameters in all.
    pub fn num_params(&self) -> usize {
        self.pairs.iter().map(|p| p.phi.len() + p.psi.len()).sum()
    }
    /// Lengths of the parameter tensors in optimiser order: `phi_0, psi_0, phi_1, psi_1, ...`.
    pub fn param_sizes(&self) -> Vec<usize> {
        self.pairs.iter().flat_map(|p| [p.phi.len(), p.psi.len()]).collect()
    }
    /// The parameter tensors in optimiser order: `phi_0, psi_0, phi_1, psi_1, ...`.
    pub fn params_mut(&mut self) -> Vec<&mut [f32]> {
        self.pairs.iter_mut().flat_map(|p| [p.phi.as_mut_slice(), p.psi.as_mut_slice()]).collect()
    }
}
