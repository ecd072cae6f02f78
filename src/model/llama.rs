//! The Llama model, written once over [`Backend`]: forward (saving what the backward needs),
//! a hand-written backward that produces the adapter gradients only, and greedy decoding
//! with a KV cache.
//!
//! Per layer `l` with residual stream `x` (`T x d`):
//!
//! ```text
//! a  = rmsnorm(x) * w_attn;  q, k, v = proj_q(a), proj_k(a), proj_v(a);  q, k = rope(q), rope(k)
//! x2 = x + proj_o(attention(q, k, v))
//! m  = rmsnorm(x2) * w_mlp;  x' = x2 + proj_down(silu(proj_gate(m)) * proj_up(m))
//! ```
//!
//! then `logits = (rmsnorm(x) * w_final) E^T` (tied or untied head) and the mean
//! cross-entropy over the labelled positions. Each `proj_*` is a frozen linear layer or,
//! where the adapter has a pair for that site, a WeGeFT layer `y = x W^T + (x psi^T)(s W phi)^T`,
//! plus a frozen bias where the model has one (Qwen2's q, k, v). Qwen3 RMS-norms every query
//! and key head (weights `q_norm`, `k_norm` of `head_dim`) between the projection and RoPE.

use crate::backend::{AttnShape, Backend, Dropout};
use crate::error::{Error, Result};
use crate::shape::LayerShape;

/// The seven projection module types of a Llama layer, in this order everywhere.
pub const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Index of a module name (`"q_proj"`, ... ) in [`MODULES`].
pub fn module_index(name: &str) -> Result<usize> {
    MODULES
        .iter()
        .position(|m| *m == name)
        .ok_or_else(|| Error::invalid("module", format!("unknown module {name:?}; expected one of {MODULES:?}")))
}

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// The dimensions of a Llama model.
#[derive(Clone, Debug, PartialEq)]
pub struct Dims {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// RoPE's base and scaling.
    pub rope: crate::rope::Rope,
    pub eps: f32,
    /// A sliding attention window ([`crate::model::LlamaConfig::sliding_window`]): query `i`
    /// attends to keys `i - window < j <= i`, in every layer but `full_layers`.
    pub window: Option<usize>,
    /// Layers (ascending) that keep full causal attention despite `window`.
    pub full_layers: Vec<usize>,
    /// Layers (ascending) whose q and k get no RoPE (SmolLM3's every 4th); empty for the rest.
    pub nope_layers: Vec<usize>,
}

impl Dims {
    /// `(d_in, d_out)` of module `m` (index into [`MODULES`]; 6 and above read as `down_proj`).
    pub fn module_dims(&self, m: usize) -> (usize, usize) {
        let (d, q, kv, f) = (self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.ffn);
        match m {
            Q => (d, q),
            K | V => (d, kv),
            O => (q, d),
            GATE | UP => (d, f),
            _ => (f, d),
        }
    }
    /// Whether layer `l` applies RoPE to q and k (all but [`Dims::nope_layers`]).
    pub fn rope_at(&self, l: usize) -> bool {
        self.nope_layers.binary_search(&l).is_err()
    }
    /// The sliding window of layer `l`, if it has one.
    pub fn window_at(&self, l: usize) -> Option<usize> {
        self.window.filter(|_| self.full_layers.binary_search(&l).is_err())
    }
    /// Checks that every dimension is positive, that the heads divide evenly, and RoPE's
    /// parameters ([`crate::rope::Rope::check`]).
    pub fn check(&self) -> Result<()> {
        for (what, v) in [
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("ffn", self.ffn),
            ("vocab", self.vocab),
        ] {
            if v == 0 {
                return Err(Error::ZeroDim { what });
            }
        }
        if self.window == Some(0) {
            return Err(Error::ZeroDim { what: "window" });
        }
        crate::model::config::check_layer_list(&self.nope_layers, self.layers)
            .map_err(|m| Error::invalid("nope_layers", m))?;
        crate::model::config::check_layer_list(&self.full_layers, self.layers)
            .map_err(|m| Error::invalid("full_layers", m))?;
        if self.heads % self.kv_heads != 0 || self.head_dim % 2 != 0 {
            return Err(Error::invalid(
                "dims",
                format!(
                    "heads {} must be a multiple of kv_heads {}, head_dim {} even",
                    self.heads, self.kv_heads, self.head_dim
                ),
            ));
        }
        self.rope.check(self.head_dim).map_err(|m| Error::invalid("rope", m))
    }
}

/// Host-side weights of one layer (f32, row-major, HF layout: projections `d_out x d_in`,
/// q/k rows ordered for rotate-half RoPE).
#[derive(Clone, Debug)]
pub struct HostLayer {
    pub attn_norm: Vec<f32>,
    pub mlp_norm: Vec<f32>,
    /// In [`MODULES`] order.
    pub proj: [Vec<f32>; 7],
    /// The projections' biases (`d_out`), where they have one, in [`MODULES`] order.
    pub bias: [Option<Vec<f32>>; 7],
    /// Qwen3's RMSNorm weights (`head_dim` each) of every query head and every key head.
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
}

/// Host-side weights of a whole model.
#[derive(Clone, Debug)]
pub struct HostWeights {
    pub dims: Dims,
    /// `vocab x hidden`.
    pub embed: Vec<f32>,
    pub final_norm: Vec<f32>,
    /// `vocab x hidden`; `None` when the head is tied to `embed`.
    pub lm_head: Option<Vec<f32>>,
    pub layers: Vec<HostLayer>,
}

struct Layer<B: Backend> {
    attn_norm: B::Buf,
    mlp_norm: B::Buf,
    proj: [B::Buf; 7],
    bias: [Option<B::Buf>; 7],
    qk_norm: Option<(B::Buf, B::Buf)>,
}

/// A Llama model whose weights live on backend `B`.
pub struct Llama<B: Backend> {
    pub dims: Dims,
    embed: B::Buf,
    final_norm: B::Buf,
    lm_head: Option<B::Buf>,
    layers: Vec<Layer<B>>,
}

/// One trainable pair `(phi, psi)` on the backend: `phi` is `d_in x r`, `psi` is `r x d_in`.
pub struct Pair<B: Backend> {
    /// Module index (into [`MODULES`]) of the first site using this pair (a sharing group may
    /// hand it to other module types of the same `d_in` too).
    pub module: usize,
    pub phi: B::Buf,
    pub psi: B::Buf,
}

/// A WeGeFT adapter on the backend: pairs, and which pair each `(layer, module)` site uses.
pub struct Adapter<B: Backend> {
    pub rank: usize,
    /// `s` in `W' = W + s W phi psi` (1 for the original GIFT code, `alpha / r` for the
    /// PEFT fork).
    pub scale: f32,
    pub pairs: Vec<Pair<B>>,
    /// `sites[layer][module]`: index into `pairs`, or `None` for a frozen projection.
    pub sites: Vec<[Option<usize>; 7]>,
    /// Dropout probability on `W` in the adapter path during training (0 = none).
    pub dropout: f32,
    /// Seed of this step's dropout masks (site `(l, m)` uses a seed mixed from it, `l`, `m`);
    /// the trainer sets a fresh one every step.
    pub dropout_seed: u64,
}

impl<B: Backend> Adapter<B> {
    /// The dropout of site `(l, m)` in training, `None` when off.
    fn dropout_at(&self, l: usize, m: usize) -> Option<Dropout> {
        (self.dropout > 0.0).then(|| Dropout {
            p: self.dropout,
            seed: self.dropout_seed ^ ((l as u64) << 32 | m as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93),
        })
    }
}

/// Host-side twin of [`Adapter`] (f32): what files hold and what the optimizer reports.
#[derive(Clone, Debug, PartialEq)]
pub struct HostAdapter {
    pub rank: usize,
    pub scale: f32,
    /// `(module index, phi (d_in x r), psi (r x d_in))`.
    pub pairs: Vec<(usize, Vec<f32>, Vec<f32>)>,
    pub sites: Vec<[Option<usize>; 7]>,
    /// Dropout probability on `W` in the adapter path during training (the PEFT fork's
    /// `wegeft_dropout`; 0 = none).
    pub dropout: f32,
}

impl HostAdapter {
    /// The official scheme: one pair per targeted module type, shared by all `layers`.
    /// `pairs` gives `(module, phi, psi)` for each target.
    pub fn shared(rank: usize, scale: f32, layers: usize, pairs: Vec<(usize, Vec<f32>, Vec<f32>)>) -> Result<Self> {
        let mut site = [None; 7];
        for (i, (m, _, _)) in pairs.iter().enumerate() {
            if *m >= 7 {
                return Err(Error::invalid("module", format!("module index {m} out of range")));
            }
            if site[*m].is_some() {
                return Err(Error::invalid("pairs", format!("two pairs for module {}", MODULES[*m])));
            }
            site[*m] = Some(i);
        }
        Ok(HostAdapter { rank, scale, pairs, sites: vec![site; layers], dropout: 0.0 })
    }

    /// Merges the adapter into the frozen weights as the file holds them
    /// (`W <- W + s W phi psi` at every adapted site, [`crate::cpu::wegeft_merge`]), so that
    /// `w` alone gives the adapter model's outputs: what `wegeft merge` writes.
    pub fn merge_into(&self, w: &mut crate::model::LlamaWeights) -> Result<()> {
        let dims = Dims::from_config(&w.config);
        self.check(&dims)?;
        for (l, m, phi, psi) in self.adapted_sites() {
            let (d_in, d_out) = dims.module_dims(m);
            let t = w.layers[l].linear_mut(MODULES[m])?;
            crate::cpu::wegeft_merge(
                &LayerShape::new(1, d_in, d_out, self.rank)?,
                crate::shape::MatMut::new("W", &mut t.data, d_out, d_in)?,
                crate::shape::Mat::new("phi", phi, d_in, self.rank)?,
                crate::shape::Mat::new("psi", psi, self.rank, d_in)?,
                self.scale,
            )?;
        }
        Ok(())
    }

    /// Every adapted site, in model order: `(layer, module index, phi, psi)`.
    fn adapted_sites(&self) -> impl Iterator<Item = (usize, usize, &[f32], &[f32])> + '_ {
        self.sites.iter().enumerate().flat_map(move |(l, row)| {
            row.iter().enumerate().filter_map(move |(m, p)| {
                let (_, phi, psi) = &self.pairs[(*p)?];
                Some((l, m, phi.as_slice(), psi.as_slice()))
            })
        })
    }

    /// The same update as a standard LoRA adapter on the frozen weights as the file holds
    /// them: at every adapted site `A = psi` and `B = s W phi` (see [`crate::adapter::lora`]),
    /// so that `W + B A` is what [`HostAdapter::merge_into`] makes of `W`. Dropout on `W` is a
    /// training-time regulariser and takes no part.
    pub fn to_lora(&self, w: &crate::model::LlamaWeights) -> Result<crate::adapter::lora::Lora> {
        use crate::adapter::lora::{Lora, LoraSite};
        use crate::cpu::gemm::{matmul, Op};
        use crate::shape::{Mat, MatMut};
        let dims = Dims::from_config(&w.config);
        self.check(&dims)?;
        let r = self.rank;
        let mut sites = Vec::new();
        for (l, m, phi, psi) in self.adapted_sites() {
            let (d_in, d_out) = dims.module_dims(m);
            let t = w.layers[l].linear(MODULES[m])?;
            let mut b = vec![0.0f32; d_out * r];
            matmul(
                &mut MatMut::new("B", &mut b, d_out, r)?,
                0.0,
                self.scale,
                Mat::new("W", &t.data, d_out, d_in)?,
                Op::N,
                Mat::new("phi", phi, d_in, r)?,
                Op::N,
            )?;
            let module = crate::adapter::Module::ALL[m];
            sites.push(LoraSite { layer: l, module, d_in, d_out, a: psi.to_vec(), b });
        }
        let lora = Lora { rank: r, n_layers: dims.layers, sites };
        lora.check()?;
        Ok(lora)
    }

    /// Checks the pair shapes against `dims` and that every site points at a pair of its
    /// own module type.
    pub fn check(&self, dims: &Dims) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::ZeroDim { what: "rank" });
        }
        Dropout { p: self.dropout, seed: 0 }.check()?;
        if self.sites.len() != dims.layers {
            return Err(Error::invalid(
                "adapter sites",
                format!("{} layers, model has {}", self.sites.len(), dims.layers),
            ));
        }
        for (k, (m, phi, psi)) in self.pairs.iter().enumerate() {
            if *m >= MODULES.len() {
                return Err(Error::invalid("adapter pair", format!("pair {k}: module index {m} is not below {}", MODULES.len())));
            }
            let (d_in, _) = dims.module_dims(*m);
            if phi.len() != d_in * self.rank || psi.len() != d_in * self.rank {
                return Err(Error::invalid(
                    "adapter pair",
                    format!(
                        "{}: phi has {} and psi {} elements, expected {d_in} x {} = {}",
                        MODULES[*m],
                        phi.len(),
                        psi.len(),
                        self.rank,
                        d_in * self.rank
                    ),
                ));
            }
        }
        for (l, row) in self.sites.iter().enumerate() {
            for (m, p) in row.iter().enumerate() {
                if let Some(p) = p {
                    // A pair may serve several module types (sharing groups) of the same d_in.
                    let (d_in, _) = dims.module_dims(m);
                    match self.pairs.get(*p) {
                        Some((_, phi, _)) if phi.len() == d_in * self.rank => {}
                        _ => {
                            return Err(Error::invalid(
                                "adapter sites",
                                format!(
                                    "layer {l} {} points at pair {p}, which is missing or not {d_in} x {}",
                                    MODULES[m], self.rank
                                ),
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Puts the adapter on the backend.
    pub fn upload<B: Backend>(&self, be: &B, dims: &Dims) -> Result<Adapter<B>> {
        self.check(dims)?;
        let pairs = self
            .pairs
            .iter()
            .map(|(m, phi, psi)| Ok(Pair { module: *m, phi: be.upload(phi)?, psi: be.upload(psi)? }))
            .collect::<Result<Vec<_>>>()?;
        Ok(Adapter {
            rank: self.rank,
            scale: self.scale,
            pairs,
            sites: self.sites.clone(),
            dropout: self.dropout,
            dropout_seed: 0,
        })
    }
}

/// One stack of the adapters that target a site: every member's `phi_a` (`d_in x rank`) and
/// `psi_a` (`rank x d_in`), zero-padded to the largest member rank (the padding adds exact
/// zeros to `u` and to the edit), stacked `members x d_in x rank` / `members x rank x d_in`.
pub struct MultiStack<B: Backend> {
    pub rank: usize,
    pub phi: B::Buf,
    pub psi: B::Buf,
    /// `s_a` of each member.
    pub scales: Vec<f32>,
    /// `slot[a]`: adapter `a`'s member index in this stack, `-1` when `a` does not target it.
    pub slot: Vec<i32>,
}

/// Several adapters on one base model, for batched inference where each sequence uses its own
/// adapter (or none): per `(layer, module)` site, the stack of the adapters' pairs for
/// [`Backend::wegeft_multi_forward`]. Sites whose adapters use the same pairs (a pair shared by
/// layers) share one stack.
pub struct MultiAdapter<B: Backend> {
    /// `A`, the number of adapters.
    pub count: usize,
    pub stacks: Vec<MultiStack<B>>,
    /// `sites[layer][module]`: index into `stacks`, `None` where no adapter targets the site.
    pub sites: Vec<[Option<usize>; 7]>,
}

impl<B: Backend> MultiAdapter<B> {
    /// Stacks `adapters` (each checked against `dims`; ranks and scales may differ) on the
    /// backend. Adapter `a` is index `a` of [`Llama::generate_multi`] and friends.
    pub fn upload(be: &B, dims: &Dims, adapters: &[HostAdapter]) -> Result<Self> {
        if adapters.is_empty() {
            return Err(Error::ZeroDim { what: "adapters" });
        }
        for (a, h) in adapters.iter().enumerate() {
            h.check(dims).map_err(|e| Error::invalid("adapters", format!("adapter {a}: {e}")))?;
        }
        let mut keys: Vec<Vec<Option<usize>>> = Vec::new();
        let mut stacks = Vec::new();
        let mut sites = vec![[None; 7]; dims.layers];
        for (l, row) in sites.iter_mut().enumerate() {
            for (m, site) in row.iter_mut().enumerate() {
                let key: Vec<Option<usize>> = adapters.iter().map(|h| h.sites[l][m]).collect();
                if key.iter().all(|k| k.is_none()) {
                    continue;
                }
                if let Some(i) = keys.iter().position(|k| *k == key) {
                    *site = Some(i);
                    continue;
                }
                let (d_in, _) = dims.module_dims(m);
                let rank = adapters.iter().zip(&key).filter(|(_, k)| k.is_some()).map(|(h, _)| h.rank).max().unwrap_or(1);
                let (mut phi, mut psi, mut scales, mut slot) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for (h, k) in adapters.iter().zip(&key) {
                    let Some(p) = *k else {
                        slot.push(-1);
                        continue;
                    };
                    slot.push(scales.len() as i32);
                    scales.push(h.scale);
                    let (_, ph, ps) = &h.pairs[p];
                    let r = h.rank;
                    for i in 0..d_in {
                        phi.extend_from_slice(&ph[i * r..(i + 1) * r]);
                        phi.extend(std::iter::repeat(0.0).take(rank - r));
                    }
                    psi.extend_from_slice(ps);
                    psi.extend(std::iter::repeat(0.0).take((rank - r) * d_in));
                }
                stacks.push(MultiStack { rank, phi: be.upload_vec(phi)?, psi: be.upload_vec(psi)?, scales, slot });
                keys.push(key);
                *site = Some(stacks.len() - 1);
            }
        }
        Ok(MultiAdapter { count: adapters.len(), stacks, sites })
    }
}

/// Which adapters a forward pass uses: one (or none) for every row, or one per sequence.
enum Adapt<'a, B: Backend> {
    One(Option<&'a Adapter<B>>),
    /// Per-sequence adapter indices into the stacks (`-1`: none) in [`Llama::run`]; per row in
    /// `proj_forward`.
    Multi(&'a MultiAdapter<B>, &'a [i32]),
}

impl<B: Backend> Clone for Adapt<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Adapt<'_, B> {}

impl<B: Backend> Adapter<B> {
    /// The adapter, back on the host.
    pub fn download(&self, be: &B) -> Result<HostAdapter> {
        let pairs = self
            .pairs
            .iter()
            .map(|p| Ok((p.module, be.download(&p.phi)?, be.download(&p.psi)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(HostAdapter { rank: self.rank, scale: self.scale, pairs, sites: self.sites.clone(), dropout: self.dropout })
    }
    /// Zeroed gradient buffers, one `(dphi, dpsi)` per pair.
    pub fn zero_grads(&self, be: &B) -> Result<Vec<(B::Buf, B::Buf)>> {
        self.pairs.iter().map(|p| Ok((be.zeros(be.len(&p.phi))?, be.zeros(be.len(&p.psi))?))).collect()
    }
}

/// A batch of `batch` sequences of `seq` tokens each (row-major, `batch * seq` ids).
/// `labels[t]` is the token that position `t` must predict, or `-1` for no loss there.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Batch {
    /// Sequences with the loss on every next token (`labels[t] = ids[t+1]`, none on the last).
    pub fn causal(seqs: &[Vec<u32>]) -> Result<Batch> {
        let seq = seqs.first().map(|s| s.len()).unwrap_or(0);
        if seqs.is_empty() || seq == 0 || seqs.iter().any(|s| s.len() != seq) {
            return Err(Error::invalid("batch", "needs one or more non-empty sequences of equal length"));
        }
        let mut ids = Vec::with_capacity(seqs.len() * seq);
        let mut labels = Vec::with_capacity(seqs.len() * seq);
        for s in seqs {
            ids.extend_from_slice(s);
            labels.extend(s[1..].iter().map(|&t| t as i32));
            labels.push(-1);
        }
        Ok(Batch { batch: seqs.len(), seq, ids, labels })
    }
    /// Number of labelled positions.
    pub fn count(&self) -> usize {
        self.labels.iter().filter(|&&l| l >= 0).count()
    }
    fn check(&self, vocab: usize) -> Result<()> {
        let n = self.batch * self.seq;
        if n == 0 || self.ids.len() != n || self.labels.len() != n {
            return Err(Error::invalid(
                "batch",
                format!(
                    "{} x {} needs {n} ids and labels, got {} and {}",
                    self.batch,
                    self.seq,
                    self.ids.len(),
                    self.labels.len()
                ),
            ));
        }
        if let Some(&id) = self.ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::invalid("batch ids", format!("token id {id} is outside the vocabulary of {vocab}")));
        }
        Ok(())
    }
    fn positions(&self) -> Vec<u32> {
        (0..self.batch).flat_map(|_| 0..self.seq as u32).collect()
    }
}

/// What one layer's forward keeps for its backward. The normed inputs (`xn1`, `xn2`, with
/// their `rstd`) and the SwiGLU output `h` are not kept: the backward recomputes them from
/// `x`, `x2`, `gate` and `up` with the same deterministic kernels (the same bits), which
/// cuts the saved activations per token and layer from `8 d + 3 ffn` to `6 d + 2 ffn` floats
/// (SmolLM2: 8448 -> 5760, a third less) for two cheap elementwise passes. `q`, `k`, `v`,
/// `att`, `gate` and `up` are [`Backend::stash`]ed (bf16 on CUDA: 5760 floats' 23 KB per token
/// and layer become 13.8 KB); the residual stream `x`, `x2` stays f32, since the norms are
/// recomputed from it.
struct LayerActs<B: Backend> {
    x: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    att: B::Buf,
    lse: B::Buf,
    x2: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    /// Qwen3: q and k as projected, before the head norm (f32).
    qk_pre: Option<(B::Buf, B::Buf)>,
    /// What each adapted projection's forward saved (`u`, `C`).
    saved: [Option<B::Saved>; 7],
}

/// Per-layer key/value cache for greedy decoding of `batch` sequences of equal length
/// (`batch x capacity x kv_heads*head_dim` per layer).
pub struct KvCache<B: Backend> {
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    batch: usize,
    len: usize,
    capacity: usize,
}

impl<B: Backend> KvCache<B> {
    /// Sequences in the cache.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Tokens per sequence already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// How a forward pass treats keys and values.
enum Mode<'c, B: Backend> {
    /// Training/scoring over whole sequences; `save` keeps the activations.
    Full { save: bool },
    /// Append the new tokens' keys/values to the cache and attend over all of it.
    Cached(&'c mut KvCache<B>),
}

impl<B: Backend> Llama<B> {
    /// Uploads host weights to the backend after checking every shape against `w.dims`.
    pub fn new(be: &B, w: &HostWeights) -> Result<Self> {
        Self::from_host(be, w.clone())
    }

    /// Like [`Llama::new`], taking the host weights over (no copy on the CPU).
    pub fn from_host(be: &B, w: HostWeights) -> Result<Self> {
        let d = w.dims.clone();
        d.check()?;
        let chk = |name: String, v: &[f32], n: usize| -> Result<()> {
            if v.len() != n {
                return Err(Error::invalid("weights", format!("{name}: {} elements, expected {n}", v.len())));
            }
            Ok(())
        };
        chk("embed_tokens".into(), &w.embed, d.vocab * d.hidden)?;
        chk("norm".into(), &w.final_norm, d.hidden)?;
        if let Some(h) = &w.lm_head {
            chk("lm_head".into(), h, d.vocab * d.hidden)?;
        }
        if w.layers.len() != d.layers {
            return Err(Error::invalid("weights", format!("{} layers, config says {}", w.layers.len(), d.layers)));
        }
        for (l, hl) in w.layers.iter().enumerate() {
            chk(format!("layers.{l}.input_layernorm"), &hl.attn_norm, d.hidden)?;
            chk(format!("layers.{l}.post_attention_layernorm"), &hl.mlp_norm, d.hidden)?;
            for (m, name) in MODULES.iter().enumerate() {
                let (i, o) = d.module_dims(m);
                chk(format!("layers.{l}.{name}"), &hl.proj[m], i * o)?;
                if let Some(b) = &hl.bias[m] {
                    chk(format!("layers.{l}.{name}.bias"), b, o)?;
                }
            }
            if let Some((qn, kn)) = &hl.qk_norm {
                chk(format!("layers.{l}.q_norm"), qn, d.head_dim)?;
                chk(format!("layers.{l}.k_norm"), kn, d.head_dim)?;
            }
        }
        let mut layers = Vec::with_capacity(d.layers);
        for hl in w.layers {
            let [q, k, v, o, g, u, dn] = hl.proj;
            let mut bias: [Option<B::Buf>; 7] = Default::default();
            for (b, h) in bias.iter_mut().zip(hl.bias) {
                *b = h.map(|h| be.upload_vec(h)).transpose()?;
            }
            let qk_norm = match hl.qk_norm {
                Some((qn, kn)) => Some((be.upload_vec(qn)?, be.upload_vec(kn)?)),
                None => None,
            };
            layers.push(Layer {
                bias,
                qk_norm,
                attn_norm: be.upload_vec(hl.attn_norm)?,
                mlp_norm: be.upload_vec(hl.mlp_norm)?,
                proj: [
                    be.upload_weight(q)?,
                    be.upload_weight(k)?,
                    be.upload_weight(v)?,
                    be.upload_weight(o)?,
                    be.upload_weight(g)?,
                    be.upload_weight(u)?,
                    be.upload_weight(dn)?,
                ],
            });
        }
        Ok(Llama {
            dims: d,
            embed: be.upload_weight(w.embed)?,
            final_norm: be.upload_vec(w.final_norm)?,
            lm_head: w.lm_head.map(|h| be.upload_weight(h)).transpose()?,
            layers,
        })
    }

    fn head(&self) -> &B::Buf {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Frozen weight of `(layer, module)`, downloaded (for merging).
    pub fn weight(&self, be: &B, layer: usize, module: usize) -> Result<Vec<f32>> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::invalid("layer", format!("{layer} >= {}", self.dims.layers)))?;
        let w = l.proj.get(module).ok_or_else(|| Error::invalid("module", format!("index {module} >= 7")))?;
        be.download(w)
    }

    fn check_adapter(&self, be: &B, a: Option<&Adapter<B>>) -> Result<()> {
        if let Some(a) = a {
            if a.sites.len() != self.dims.layers {
                return Err(Error::invalid(
                    "adapter",
                    format!("{} layers of sites, model has {}", a.sites.len(), self.dims.layers),
                ));
            }
            for row in &a.sites {
                for (m, p) in row.iter().enumerate() {
                    if let Some(p) = p {
                        let (d_in, _) = self.dims.module_dims(m);
                        let ok = a
                            .pairs
                            .get(*p)
                            .map(|pair| be.len(&pair.phi) == d_in * a.rank && be.len(&pair.psi) == d_in * a.rank);
                        if ok != Some(true) {
                            return Err(Error::invalid(
                                "adapter",
                                format!("site {} points at a missing or mis-sized pair {p}", MODULES[m]),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A buffer of `n` for an activation read only by products: an [`Backend::operand`] when
    /// `narrow`, else an [`Backend::output`].
    fn product_input(be: &B, n: usize, narrow: bool) -> Result<B::Buf> {
        if narrow {
            be.operand(n)
        } else {
            be.output(n)
        }
    }

    /// Qwen3's RMSNorm of every head of `x` (`rows` rows of `heads` heads of `head_dim`) with
    /// weight `w` (`head_dim`): `(x_normed, rstd)`, new f32 buffers (RoPE rotates the first
    /// next). Deterministic, so the backward recomputes `rstd` ([`Llama::head_norm_backward`]).
    fn head_norm(&self, be: &B, x: &B::Buf, w: &B::Buf, rows: usize, heads: usize) -> Result<(B::Buf, B::Buf)> {
        let (n, hd) = (rows * heads, self.dims.head_dim);
        let mut y = be.output(n * hd)?;
        let mut rstd = be.output(n)?;
        be.rmsnorm_forward(x, w, n, hd, self.dims.eps, &mut y, &mut rstd)?;
        Ok((y, rstd))
    }

    /// The gradient with respect to the input `x` of [`Llama::head_norm`], from `dy`.
    fn head_norm_backward(&self, be: &B, x: &B::Buf, w: &B::Buf, dy: &B::Buf, rows: usize, heads: usize) -> Result<B::Buf> {
        let (n, hd) = (rows * heads, self.dims.head_dim);
        let (_, rstd) = self.head_norm(be, x, w, rows, heads)?;
        let mut dx = be.zeros(n * hd)?;
        be.rmsnorm_backward(x, w, &rstd, dy, n, hd, &mut dx)?;
        Ok(dx)
    }

    /// RMSNorm of the `rows x hidden` activations `x` with weight `w`: `(x_normed, rstd)`.
    /// Deterministic, so the backward recomputes it bit for bit instead of keeping it.
    /// `narrow`: `x_normed` is read only by products (an [`Backend::operand`]).
    fn norm(&self, be: &B, x: &B::Buf, w: &B::Buf, rows: usize, narrow: bool) -> Result<(B::Buf, B::Buf)> {
        let d = &self.dims;
        let mut xn = Self::product_input(be, rows * d.hidden, narrow)?;
        let mut rstd = be.output(rows)?;
        be.rmsnorm_forward(x, w, rows, d.hidden, d.eps, &mut xn, &mut rstd)?;
        Ok((xn, rstd))
    }

    /// The SwiGLU of `rows x ffn` gate and up activations (recomputed by the backward too),
    /// an [`Backend::operand`] when `narrow`.
    fn swiglu(&self, be: &B, gate: &B::Buf, up: &B::Buf, rows: usize, narrow: bool) -> Result<B::Buf> {
        let mut h = Self::product_input(be, rows * self.dims.ffn, narrow)?;
        be.swiglu_forward(gate, up, &mut h)?;
        Ok(h)
    }

    /// The products' copies of every pair of `adapter` ([`Backend::operand_copy`]: bf16 on the
    /// CUDA engine), made once per pass: every layer reads the same pair.
    fn pair_operands(be: &B, adapter: &Adapt<'_, B>) -> Result<Vec<(B::Buf, B::Buf)>> {
        match adapter {
            Adapt::One(Some(a)) => {
                a.pairs.iter().map(|p| Ok((be.operand_copy(&p.phi)?, be.operand_copy(&p.psi)?))).collect()
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Pair `p` of `a` as the products read it: its copy in `ops` when there is one.
    fn pair_of<'b>(a: &'b Adapter<B>, ops: &'b [(B::Buf, B::Buf)], p: usize) -> (&'b B::Buf, &'b B::Buf) {
        match ops.get(p) {
            Some((phi, psi)) => (phi, psi),
            None => (&a.pairs[p].phi, &a.pairs[p].psi),
        }
    }

    /// One projection's forward, plus its frozen bias if it has one; returns `y` and, when
    /// `save` and adapted, `(u, C)`.
    #[allow(clippy::too_many_arguments)]
    fn proj_forward(
        &self,
        be: &B,
        l: usize,
        m: usize,
        x: &B::Buf,
        rows: usize,
        adapter: Adapt<'_, B>,
        ops: &[(B::Buf, B::Buf)],
        save: bool,
    ) -> Result<(B::Buf, Option<B::Saved>)> {
        let (d_in, d_out) = self.dims.module_dims(m);
        let w = &self.layers[l].proj[m];
        let mut y = be.output(rows * d_out)?;
        let saved = 'product: {
            let adapter = match adapter {
                Adapt::One(a) => a,
                Adapt::Multi(ma, row_idx) => {
                    if let Some(si) = ma.sites[l][m] {
                        let st = &ma.stacks[si];
                        let idx: Vec<i32> =
                            row_idx.iter().map(|&a| if a < 0 { -1 } else { st.slot[a as usize] }).collect();
                        if idx.iter().any(|&a| a >= 0) {
                            be.wegeft_multi_forward(
                                rows, d_in, d_out, st.rank, x, w, &st.phi, &st.psi, &st.scales, &idx, &mut y,
                            )?;
                            break 'product None;
                        }
                    }
                    None
                }
            };
            if let Some((a, p)) = adapter.and_then(|a| a.sites[l][m].map(|p| (a, p))) {
                let (phi, psi) = Self::pair_of(a, ops, p);
                let shape = LayerShape::new(rows, d_in, d_out, a.rank)?;
                // Dropout only in training (when the activations are saved for a backward).
                let drop = if save { a.dropout_at(l, m) } else { None };
                let saved = be.wegeft_forward(shape, x, w, phi, psi, a.scale, drop, &mut y)?;
                break 'product save.then_some(saved);
            }
            be.linear_forward(x, w, rows, d_in, d_out, &mut y)?;
            None
        };
        if let Some(b) = &self.layers[l].bias[m] {
            be.add_bias(&mut y, b, rows, d_out)?;
        }
        Ok((y, saved))
    }

    /// One projection's backward: input gradient into `dx` (if given) and adapter gradients.
    #[allow(clippy::too_many_arguments)]
    fn proj_backward(
        &self,
        be: &B,
        l: usize,
        m: usize,
        x: &B::Buf,
        g: &B::Buf,
        rows: usize,
        adapter: Option<&Adapter<B>>,
        ops: &[(B::Buf, B::Buf)],
        saved: &Option<B::Saved>,
        dx: Option<(&mut B::Buf, bool)>,
        grads: &mut [(B::Buf, B::Buf)],
    ) -> Result<()> {
        let (d_in, d_out) = self.dims.module_dims(m);
        let w = &self.layers[l].proj[m];
        if let (Some(a), Some(saved)) = (adapter, saved) {
            if let Some(p) = a.sites[l][m] {
                let shape = LayerShape::new(rows, d_in, d_out, a.rank)?;
                let (dphi, dpsi) = &mut grads[p];
                let (phi, psi) = Self::pair_of(a, ops, p);
                let drop = a.dropout_at(l, m);
                return be.wegeft_backward(shape, x, w, phi, psi, a.scale, drop, saved, g, dx, dphi, dpsi);
            }
        }
        if let Some((dx, acc)) = dx {
            be.linear_backward(g, w, rows, d_in, d_out, dx, acc)?;
        }
        Ok(())
    }

    /// Runs the layers on `ids` (`batch` sequences of `seq` tokens, or new tokens for a
    /// cache) and returns the final normed hidden states, their input and rstd, the per-layer
    /// activations when asked, and the pairs' product copies (for a backward).
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn run(
        &self,
        be: &B,
        adapter: Adapt<'_, B>,
        ids: &[u32],
        batch: usize,
        seq: usize,
        positions: &[u32],
        mut mode: Mode<'_, B>,
    ) -> Result<(B::Buf, B::Buf, B::Buf, Vec<LayerActs<B>>, Vec<(B::Buf, B::Buf)>)> {
        let d = &self.dims;
        let rows = ids.len();
        let (qw, kw) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
        let mut x = be.output(rows * d.hidden)?;
        be.embedding_forward(&self.embed, d.vocab, d.hidden, ids, &mut x)?;
        let save = matches!(mode, Mode::Full { save: true });
        // Activations read only by products may be narrow (Backend::operand) on whole
        // sequences with one adapter; decoding's attention and the many-adapter edit read f32.
        let narrow = matches!(mode, Mode::Full { .. }) && matches!(adapter, Adapt::One(_));
        // Multi: per-sequence indices to per-row ones.
        let row_idx: Vec<i32> = match adapter {
            Adapt::Multi(_, seq_idx) => {
                if seq_idx.len() != batch || rows != batch * seq {
                    return Err(Error::invalid(
                        "adapter_of_seq",
                        format!("{} indices for {batch} sequences of {seq} tokens", seq_idx.len()),
                    ));
                }
                seq_idx.iter().flat_map(|&a| std::iter::repeat(a).take(seq)).collect()
            }
            Adapt::One(_) => Vec::new(),
        };
        let adapter = match adapter {
            Adapt::Multi(ma, _) => Adapt::Multi(ma, &row_idx),
            one => one,
        };
        let ops = Self::pair_operands(be, &adapter)?;
        let mut acts = Vec::new();
        for l in 0..d.layers {
            let layer = &self.layers[l];
            let (xn1, _) = self.norm(be, &x, &layer.attn_norm, rows, narrow)?;
            let (mut q, sq) = self.proj_forward(be, l, Q, &xn1, rows, adapter, &ops, save)?;
            let (mut k, sk) = self.proj_forward(be, l, K, &xn1, rows, adapter, &ops, save)?;
            let (v, sv) = self.proj_forward(be, l, V, &xn1, rows, adapter, &ops, save)?;
            // Qwen3: q and k are normed per head; the backward needs them as projected.
            let mut qk_pre = None;
            if let Some((qn, kn)) = &layer.qk_norm {
                let (qh, kh) = (self.head_norm(be, &q, qn, rows, d.heads)?.0, self.head_norm(be, &k, kn, rows, d.kv_heads)?.0);
                let (qp, kp) = (std::mem::replace(&mut q, qh), std::mem::replace(&mut k, kh));
                if save {
                    qk_pre = Some((qp, kp));
                }
            }
            if d.rope_at(l) {
                be.rope(&mut q, d.heads, d.head_dim, positions, &d.rope, false)?;
                be.rope(&mut k, d.kv_heads, d.head_dim, positions, &d.rope, false)?;
            }
            let mut att = Self::product_input(be, rows * qw, narrow)?;
            let window = d.window_at(l);
            let lse = match &mut mode {
                Mode::Full { .. } => {
                    let shape = AttnShape::new(batch, seq, d.heads, d.kv_heads, d.head_dim)?.with_window(window)?;
                    let mut lse = be.output(rows * d.heads)?;
                    be.attention_forward(shape, &q, &k, &v, &mut att, &mut lse)?;
                    lse
                }
                Mode::Cached(cache) => {
                    // `batch` sequences of `seq` new tokens each.
                    if cache.batch != batch || cache.len + seq > cache.capacity {
                        return Err(Error::invalid(
                            "kv cache",
                            format!(
                                "{batch} x {seq} new tokens for a cache of {} sequences holding {} of {}",
                                cache.batch, cache.len, cache.capacity
                            ),
                        ));
                    }
                    for b in 0..batch {
                        let at = (b * cache.capacity + cache.len) * kw;
                        be.copy_range(&k, b * seq * kw, seq * kw, &mut cache.k[l], at)?;
                        be.copy_range(&v, b * seq * kw, seq * kw, &mut cache.v[l], at)?;
                    }
                    if cache.len == 0 {
                        // Prefill: causal attention over the new tokens.
                        let shape = AttnShape::new(batch, seq, d.heads, d.kv_heads, d.head_dim)?.with_window(window)?;
                        let mut lse = be.output(rows * d.heads)?;
                        be.attention_forward(shape, &q, &k, &v, &mut att, &mut lse)?;
                    } else if seq == 1 {
                        let (len, cap) = (cache.len + 1, cache.capacity);
                        be.attention_decode(
                            &q,
                            &cache.k[l],
                            &cache.v[l],
                            batch,
                            d.heads,
                            d.kv_heads,
                            d.head_dim,
                            cap,
                            len,
                            window,
                            &mut att,
                        )?;
                    } else {
                        return Err(Error::invalid("kv cache", "after the prefill, tokens are fed one at a time"));
                    }
                    be.zeros(0)?
                }
            };
            let (o, so) = self.proj_forward(be, l, O, &att, rows, adapter, &ops, save)?;
            // x2 = x + o (x itself is kept for the backward when saving).
            let mut x2 = be.output(rows * d.hidden)?;
            be.add(&x, &o, &mut x2)?;
            drop(o);
            let (xn2, _) = self.norm(be, &x2, &layer.mlp_norm, rows, narrow)?;
            let (gate, sg) = self.proj_forward(be, l, GATE, &xn2, rows, adapter, &ops, save)?;
            let (up, su) = self.proj_forward(be, l, UP, &xn2, rows, adapter, &ops, save)?;
            let h = self.swiglu(be, &gate, &up, rows, narrow)?;
            let (down, sd) = self.proj_forward(be, l, DOWN, &h, rows, adapter, &ops, save)?;
            let mut x3 = be.output(rows * d.hidden)?;
            be.add(&x2, &down, &mut x3)?;
            if save {
                acts.push(LayerActs {
                    x,
                    q: be.stash(q)?,
                    k: be.stash(k)?,
                    v: be.stash(v)?,
                    att: be.stash(att)?,
                    lse,
                    x2,
                    gate: be.stash(gate)?,
                    up: be.stash(up)?,
                    qk_pre,
                    saved: [sq, sk, sv, so, sg, su, sd],
                });
            }
            x = x3;
        }
        if let Mode::Cached(cache) = &mut mode {
            cache.len += seq;
        }
        let (hn, rstd) = self.norm(be, &x, &self.final_norm, rows, false)?;
        Ok((hn, x, rstd, acts, ops))
    }

    /// Mean cross-entropy over the labelled positions of `batch` (no gradients).
    pub fn loss(&self, be: &B, adapter: Option<&Adapter<B>>, batch: &Batch) -> Result<f32> {
        batch.check(self.dims.vocab)?;
        self.check_adapter(be, adapter)?;
        let n = batch.count();
        if n == 0 {
            return Err(Error::invalid("batch", "no labelled positions"));
        }
        let (hn, _, _, _, _) =
            self.run(be, Adapt::One(adapter), &batch.ids, batch.batch, batch.seq, &batch.positions(), Mode::Full { save: false })?;
        let sum = be.lm_head_loss(&hn, self.head(), self.dims.hidden, self.dims.vocab, &batch.labels, None)?;
        Ok(sum / n as f32)
    }

    /// Logits (`T x vocab`, on the host) of one sequence at every position, and the mean
    /// next-token loss over it (`None` for a single token).
    pub fn score(&self, be: &B, adapter: Option<&Adapter<B>>, ids: &[u32]) -> Result<(Vec<f32>, Option<f32>)> {
        let batch = Batch::causal(&[ids.to_vec()])?;
        batch.check(self.dims.vocab)?;
        self.check_adapter(be, adapter)?;
        let (hn, _, _, _, _) =
            self.run(be, Adapt::One(adapter), &batch.ids, 1, ids.len(), &batch.positions(), Mode::Full { save: false })?;
        let mut logits = be.output(ids.len() * self.dims.vocab)?;
        be.logits(&hn, self.head(), ids.len(), self.dims.hidden, self.dims.vocab, &mut logits)?;
        let loss = if ids.len() > 1 {
            Some(
                be.lm_head_loss(&hn, self.head(), self.dims.hidden, self.dims.vocab, &batch.labels, None)?
                    / (ids.len() - 1) as f32,
            )
        } else {
            None
        };
        Ok((be.download(&logits)?, loss))
    }

    /// The mean cross-entropy over the labelled positions of `batch` and its gradient with
    /// respect to every adapter pair, *added* to `grads` (one `(dphi, dpsi)` per pair, as
    /// from [`Adapter::zero_grads`]). Frozen weights get no gradient. This is the training
    /// pass: the adapter's weight dropout (if any) applies, with masks from
    /// `adapter.dropout_seed`; [`Llama::loss`] and [`Llama::score`] evaluate without it.
    pub fn loss_and_grad(
        &self,
        be: &B,
        adapter: &Adapter<B>,
        batch: &Batch,
        grads: &mut [(B::Buf, B::Buf)],
    ) -> Result<f32> {
        self.loss_and_grad_over(be, adapter, batch, grads, batch.count())
    }

    /// [`Llama::loss_and_grad`] for one part of a larger batch of `total` labelled positions
    /// (gradient accumulation): the gradient *added* to `grads` is that of this batch's summed
    /// loss divided by `total`, so the parts of a batch add up to the gradient of its mean loss.
    /// Returns this batch's own mean loss. `total` must be at least this batch's count.
    pub fn loss_and_grad_over(
        &self,
        be: &B,
        adapter: &Adapter<B>,
        batch: &Batch,
        grads: &mut [(B::Buf, B::Buf)],
        total: usize,
    ) -> Result<f32> {
        batch.check(self.dims.vocab)?;
        self.check_adapter(be, Some(adapter))?;
        if grads.len() != adapter.pairs.len() {
            return Err(Error::invalid(
                "grads",
                format!("{} gradient pairs for {} adapter pairs", grads.len(), adapter.pairs.len()),
            ));
        }
        let n = batch.count();
        if n == 0 {
            return Err(Error::invalid("batch", "no labelled positions"));
        }
        if total < n {
            return Err(Error::invalid("total", format!("{total} labelled positions in all, fewer than this batch's {n}")));
        }
        let d = &self.dims;
        let rows = batch.ids.len();
        let (qw, kw) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
        let positions = batch.positions();
        let a = Some(adapter);
        let (hn, xf, rstdf, mut acts, ops) =
            self.run(be, Adapt::One(a), &batch.ids, batch.batch, batch.seq, &positions, Mode::Full { save: true })?;
        let mut dhn = be.output(rows * d.hidden)?;
        let sum =
            be.lm_head_loss(&hn, self.head(), d.hidden, d.vocab, &batch.labels, Some((&mut dhn, 1.0 / total as f32)))?;
        drop(hn);
        // dx: gradient with respect to the residual stream, walking down the layers.
        let mut dx = be.zeros(rows * d.hidden)?;
        be.rmsnorm_backward(&xf, &self.final_norm, &rstdf, &dhn, rows, d.hidden, &mut dx)?;
        drop(dhn);
        let shape = AttnShape::new(batch.batch, batch.seq, d.heads, d.kv_heads, d.head_dim)?;
        // The lowest layer with an adapted site: below it no gradient is needed.
        let lowest = (0..d.layers).find(|&l| adapter.sites[l].iter().any(|s| s.is_some()));
        let Some(lowest) = lowest else {
            return Ok(sum / n as f32);
        };
        // Walk down the layers, freeing each layer's activations once it is done.
        while let Some(act) = acts.pop() {
            let l = acts.len();
            if l < lowest {
                break;
            }
            let layer = &self.layers[l];
            // MLP: recompute h = swiglu(gate, up) and xn2 = rmsnorm(x2) (see LayerActs).
            let h = self.swiglu(be, &act.gate, &act.up, rows, true)?;
            let mut dh = be.output(rows * d.ffn)?;
            self.proj_backward(be, l, DOWN, &h, &dx, rows, a, &ops, &act.saved[DOWN], Some((&mut dh, false)), grads)?;
            // Gradients that only products read (as G) are operands, like the activations.
            let mut dgate = Self::product_input(be, rows * d.ffn, true)?;
            let mut dup = Self::product_input(be, rows * d.ffn, true)?;
            drop(h);
            be.swiglu_backward(&act.gate, &act.up, &dh, &mut dgate, &mut dup)?;
            drop(dh);
            let (xn2, rstd2) = self.norm(be, &act.x2, &layer.mlp_norm, rows, true)?;
            let mut dxn2 = be.output(rows * d.hidden)?;
            self.proj_backward(
                be,
                l,
                GATE,
                &xn2,
                &dgate,
                rows,
                a,
                &ops,
                &act.saved[GATE],
                Some((&mut dxn2, false)),
                grads,
            )?;
            self.proj_backward(be, l, UP, &xn2, &dup, rows, a, &ops, &act.saved[UP], Some((&mut dxn2, true)), grads)?;
            be.rmsnorm_backward(&act.x2, &layer.mlp_norm, &rstd2, &dxn2, rows, d.hidden, &mut dx)?;
            // Attention.
            let mut datt = Self::product_input(be, rows * qw, true)?;
            self.proj_backward(be, l, O, &act.att, &dx, rows, a, &ops, &act.saved[O], Some((&mut datt, false)), grads)?;
            // With Qwen3's head norms, dq and dk go through the norms' backward (f32) next.
            let narrow_qk = layer.qk_norm.is_none();
            let mut dq = Self::product_input(be, rows * qw, narrow_qk)?;
            let mut dk = Self::product_input(be, rows * kw, narrow_qk)?;
            let mut dv = Self::product_input(be, rows * kw, true)?;
            let shape = shape.with_window(d.window_at(l))?;
            be.attention_backward(shape, &act.q, &act.k, &act.v, &act.att, &act.lse, &datt, &mut dq, &mut dk, &mut dv)?;
            drop(datt);
            if d.rope_at(l) {
                be.rope(&mut dq, d.heads, d.head_dim, &positions, &d.rope, true)?;
                be.rope(&mut dk, d.kv_heads, d.head_dim, &positions, &d.rope, true)?;
            }
            if let (Some((qn, kn)), Some((qp, kp))) = (&layer.qk_norm, &act.qk_pre) {
                dq = self.head_norm_backward(be, qp, qn, &dq, rows, d.heads)?;
                dk = self.head_norm_backward(be, kp, kn, &dk, rows, d.kv_heads)?;
            }
            let (xn1, rstd1) = self.norm(be, &act.x, &layer.attn_norm, rows, true)?;
            if l == lowest {
                // Only the adapter gradients are needed here, not dx.
                self.proj_backward(be, l, Q, &xn1, &dq, rows, a, &ops, &act.saved[Q], None, grads)?;
                self.proj_backward(be, l, K, &xn1, &dk, rows, a, &ops, &act.saved[K], None, grads)?;
                self.proj_backward(be, l, V, &xn1, &dv, rows, a, &ops, &act.saved[V], None, grads)?;
            } else {
                let mut dxn1 = be.output(rows * d.hidden)?;
                self.proj_backward(be, l, Q, &xn1, &dq, rows, a, &ops, &act.saved[Q], Some((&mut dxn1, false)), grads)?;
                self.proj_backward(be, l, K, &xn1, &dk, rows, a, &ops, &act.saved[K], Some((&mut dxn1, true)), grads)?;
                self.proj_backward(be, l, V, &xn1, &dv, rows, a, &ops, &act.saved[V], Some((&mut dxn1, true)), grads)?;
                be.rmsnorm_backward(&act.x, &layer.attn_norm, &rstd1, &dxn1, rows, d.hidden, &mut dx)?;
            }
        }
        Ok(sum / n as f32)
    }

    /// An empty KV cache for `batch` sequences of up to `capacity` tokens each.
    pub fn new_cache(&self, be: &B, batch: usize, capacity: usize) -> Result<KvCache<B>> {
        if capacity == 0 || batch == 0 {
            return Err(Error::ZeroDim { what: "cache batch and capacity" });
        }
        let n = batch * capacity * self.dims.kv_heads * self.dims.head_dim;
        let k = (0..self.dims.layers).map(|_| be.zeros(n)).collect::<Result<Vec<_>>>()?;
        let v = (0..self.dims.layers).map(|_| be.zeros(n)).collect::<Result<Vec<_>>>()?;
        Ok(KvCache { k, v, batch, len: 0, capacity })
    }

    /// Feeds `ids` (`cache.batch()` sequences of `n` new tokens each, row-major) after what
    /// `cache` holds and returns the logits (`batch x vocab`, host) at each sequence's last
    /// new position. The first call (the prefill) takes any `n`; later tokens go through one
    /// position at a time.
    pub fn forward_cached(
        &self,
        be: &B,
        adapter: Option<&Adapter<B>>,
        ids: &[u32],
        cache: &mut KvCache<B>,
    ) -> Result<Vec<f32>> {
        self.check_adapter(be, adapter)?;
        self.forward_cached_with(be, Adapt::One(adapter), ids, cache)
    }

    /// [`Llama::forward_cached`] with several adapters: sequence `b` of the cache runs with
    /// adapter `adapter_of_seq[b]` of `multi` (`-1`: the base model). Each sequence's logits
    /// equal those of [`Llama::forward_cached`] with that adapter alone.
    pub fn forward_cached_multi(
        &self,
        be: &B,
        multi: &MultiAdapter<B>,
        adapter_of_seq: &[i32],
        ids: &[u32],
        cache: &mut KvCache<B>,
    ) -> Result<Vec<f32>> {
        self.check_multi(be, multi, adapter_of_seq, "adapter_of_seq")?;
        if adapter_of_seq.len() != cache.batch {
            return Err(Error::Len { arg: "adapter_of_seq", expected: cache.batch, got: adapter_of_seq.len() });
        }
        self.forward_cached_with(be, Adapt::Multi(multi, adapter_of_seq), ids, cache)
    }

    fn check_multi(&self, be: &B, multi: &MultiAdapter<B>, idx: &[i32], arg: &'static str) -> Result<()> {
        if multi.sites.len() != self.dims.layers {
            return Err(Error::invalid(
                "multi adapter",
                format!("{} layers of sites, model has {}", multi.sites.len(), self.dims.layers),
            ));
        }
        for row in &multi.sites {
            for (m, si) in row.iter().enumerate() {
                let Some(si) = si else { continue };
                let (d_in, _) = self.dims.module_dims(m);
                let ok = multi.stacks.get(*si).map(|st| {
                    let n = st.scales.len() * d_in * st.rank;
                    st.slot.len() == multi.count && be.len(&st.phi) == n && be.len(&st.psi) == n
                });
                if ok != Some(true) {
                    return Err(Error::invalid(
                        "multi adapter",
                        format!("site {} points at a missing or mis-sized stack {si}", MODULES[m]),
                    ));
                }
            }
        }
        if let Some((i, a)) = idx.iter().enumerate().find(|(_, &a)| a < -1 || a >= multi.count as i32) {
            return Err(Error::invalid(
                arg,
                format!("entry {i} names adapter {a}; valid are 0..{} and -1 (none)", multi.count),
            ));
        }
        Ok(())
    }

    fn forward_cached_with(&self, be: &B, adapter: Adapt<'_, B>, ids: &[u32], cache: &mut KvCache<B>) -> Result<Vec<f32>> {
        let batch = cache.batch;
        if ids.is_empty() || ids.len() % batch != 0 {
            return Err(Error::invalid("ids", format!("{} ids for a cache of {batch} sequences", ids.len())));
        }
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= self.dims.vocab) {
            return Err(Error::invalid(
                "ids",
                format!("token id {id} is outside the vocabulary of {}", self.dims.vocab),
            ));
        }
        let n = ids.len() / batch;
        let d = &self.dims;
        if cache.len + n > cache.capacity {
            return Err(Error::invalid(
                "kv cache",
                format!("{} cached + {n} new tokens exceed the capacity {}", cache.len, cache.capacity),
            ));
        }
        // A prefill runs all tokens at once; later tokens go one position at a time.
        let steps: Vec<Vec<u32>> = if cache.len == 0 {
            vec![ids.to_vec()]
        } else {
            (0..n).map(|t| (0..batch).map(|b| ids[b * n + t]).collect()).collect()
        };
        let mut last = None;
        for step in steps {
            let seq = step.len() / batch;
            let start = cache.len as u32;
            let positions: Vec<u32> = (0..batch).flat_map(|_| (0..seq as u32).map(move |i| start + i)).collect();
            let (h, _, _, _, _) = self.run(be, adapter, &step, batch, seq, &positions, Mode::Cached(cache))?;
            last = Some((h, seq));
        }
        let (hn, seq) = last.ok_or(Error::ZeroDim { what: "ids" })?;
        let mut rows = be.output(batch * d.hidden)?;
        for b in 0..batch {
            be.copy_range(&hn, (b * seq + seq - 1) * d.hidden, d.hidden, &mut rows, b * d.hidden)?;
        }
        let mut logits = be.output(batch * d.vocab)?;
        be.logits(&rows, self.head(), batch, d.hidden, d.vocab, &mut logits)?;
        be.download(&logits)
    }

    /// Greedy decoding: up to `max_new` tokens after `prompt`, stopping after any token in
    /// `stop` (which is included in the output). Returns the new tokens only.
    pub fn generate(
        &self,
        be: &B,
        adapter: Option<&Adapter<B>>,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
    ) -> Result<Vec<u32>> {
        Ok(self.generate_batch(be, adapter, &[prompt.to_vec()], max_new, stop)?.pop().unwrap_or_default())
    }

    /// Greedy decoding of many prompts; prompts of equal length run together (up to 64 at a
    /// time) through one batched KV cache. The same result as [`Llama::generate`] on each.
    pub fn generate_batch(
        &self,
        be: &B,
        adapter: Option<&Adapter<B>>,
        prompts: &[Vec<u32>],
        max_new: usize,
        stop: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        self.check_adapter(be, adapter)?;
        self.generate_with(be, None, adapter, prompts, max_new, stop)
    }

    /// Greedy decoding of many prompts, prompt `i` with adapter `adapter_of_prompt[i]` of
    /// `multi` (`-1`: the base model). Prompts of equal length run together (up to 64 at a
    /// time, whatever their adapters) through one batched KV cache, every projection one
    /// [`Backend::wegeft_multi_forward`]. The same tokens as [`Llama::generate`] with each
    /// prompt's adapter alone.
    pub fn generate_multi(
        &self,
        be: &B,
        multi: &MultiAdapter<B>,
        prompts: &[Vec<u32>],
        adapter_of_prompt: &[i32],
        max_new: usize,
        stop: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        if adapter_of_prompt.len() != prompts.len() {
            return Err(Error::Len { arg: "adapter_of_prompt", expected: prompts.len(), got: adapter_of_prompt.len() });
        }
        self.check_multi(be, multi, adapter_of_prompt, "adapter_of_prompt")?;
        self.generate_with(be, Some((multi, adapter_of_prompt)), None, prompts, max_new, stop)
    }

    fn generate_with(
        &self,
        be: &B,
        multi: Option<(&MultiAdapter<B>, &[i32])>,
        adapter: Option<&Adapter<B>>,
        prompts: &[Vec<u32>],
        max_new: usize,
        stop: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        let mut out = vec![Vec::new(); prompts.len()];
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::invalid("prompts", format!("prompt {i} is empty")));
        }
        for (i, p) in prompts.iter().enumerate() {
            if let Some(&id) = p.iter().find(|&&id| id as usize >= self.dims.vocab) {
                return Err(Error::invalid("prompts", format!("prompt {i}: token id {id} is outside the vocabulary of {}", self.dims.vocab)));
            }
        }
        if max_new == 0 {
            return Ok(out);
        }
        let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (i, p) in prompts.iter().enumerate() {
            by_len.entry(p.len()).or_default().push(i);
        }
        let v = self.dims.vocab;
        for (len, idx) in by_len {
            for group in idx.chunks(64) {
                let b = group.len();
                let seq_idx: Vec<i32> = multi.map(|(_, ix)| group.iter().map(|&i| ix[i]).collect()).unwrap_or_default();
                let adapt = match multi {
                    Some((m, _)) => Adapt::Multi(m, &seq_idx),
                    None => Adapt::One(adapter),
                };
                let mut cache = self.new_cache(be, b, len + max_new)?;
                let ids: Vec<u32> = group.iter().flat_map(|&i| prompts[i].iter().copied()).collect();
                let mut logits = self.forward_cached_with(be, adapt, &ids, &mut cache)?;
                let mut done = vec![false; b];
                for step in 0..max_new {
                    let next: Vec<u32> = (0..b).map(|j| argmax(&logits[j * v..(j + 1) * v]) as u32).collect();
                    for (j, &i) in group.iter().enumerate() {
                        if !done[j] {
                            out[i].push(next[j]);
                            done[j] = stop.contains(&next[j]) || out[i].len() >= max_new;
                        }
                    }
                    if done.iter().all(|&d| d) || step + 1 == max_new {
                        break;
                    }
                    logits = self.forward_cached_with(be, adapt, &next, &mut cache)?;
                }
            }
        }
        Ok(out)
    }
}

/// Index of the largest element (the first one on ties), 0 for an empty slice.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

impl Dims {
    /// The dimensions of a loaded model's configuration.
    pub fn from_config(c: &crate::model::LlamaConfig) -> Dims {
        Dims {
            hidden: c.hidden_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            ffn: c.intermediate_size,
            vocab: c.vocab_size,
            rope: c.rope(),
            eps: c.rms_norm_eps,
            window: c.sliding_window,
            full_layers: c.full_attention_layers.clone(),
            nope_layers: c.nope_layers.clone(),
        }
    }
    /// SmolLM2-135M's dimensions: hidden 576, 30 layers, 9 query / 3 key-value heads of 64,
    /// intermediate 1536, vocabulary 49152, rope theta 100000, eps 1e-5 (tied head).
    pub fn smollm2_135m() -> Dims {
        Dims {
            hidden: 576,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            ffn: 1536,
            vocab: 49152,
            rope: crate::rope::Rope::new(100000.0),
            eps: 1e-5,
            window: None,
            full_layers: vec![],
            nope_layers: vec![],
        }
    }
    /// The adapter-side dimensions (layers, hidden, intermediate, the attention's width).
    pub fn adapter_dims(&self) -> Result<crate::adapter::ModelDims> {
        crate::adapter::ModelDims::new(self.layers, self.hidden, self.ffn)?.with_attn_width(self.heads * self.head_dim)
    }
}

impl HostWeights {
    /// Seeded random weights for `dims` (for tests and benchmarks without a model file), every
    /// value uniform with mean `mu` and standard deviation `sigma` ([`crate::rng::Rng`], one
    /// stream per tensor): projections `sigma = 1/sqrt(d_in)` (activations stay of order 1),
    /// embedding `sigma = 0.1`, norm weights `mu = 1, sigma = 0.1`; the head is tied (`None`)
    /// unless `untied`.
    pub fn random(dims: &Dims, seed: u64, untied: bool) -> Result<HostWeights> {
        dims.check()?;
        let mut k = 0u64;
        let mut tensor = |n: usize, mu: f32, sigma: f32| -> Vec<f32> {
            k += 1;
            let mut r = crate::rng::Rng::new(seed ^ k.wrapping_mul(0xD1B5_4A32_D192_ED03));
            let a = sigma * 3f32.sqrt();
            (0..n).map(|_| mu + r.uniform_f32(-a, a)).collect()
        };
        let layers = (0..dims.layers)
            .map(|_| HostLayer {
                attn_norm: tensor(dims.hidden, 1.0, 0.1),
                mlp_norm: tensor(dims.hidden, 1.0, 0.1),
                proj: std::array::from_fn(|m| {
                    let (i, o) = dims.module_dims(m);
                    tensor(i * o, 0.0, 1.0 / (i as f32).sqrt())
                }),
                bias: Default::default(),
                qk_norm: None,
            })
            .collect();
        Ok(HostWeights {
            dims: dims.clone(),
            embed: tensor(dims.vocab * dims.hidden, 0.0, 0.1),
            final_norm: tensor(dims.hidden, 1.0, 0.1),
            lm_head: if untied { Some(tensor(dims.vocab * dims.hidden, 0.0, 0.1)) } else { None },
            layers,
        })
    }

    /// Gives every layer seeded random biases (uniform, standard deviation `0.5`) on the modules
    /// marked in `bias`, and, with `qk_norm`, Qwen3's head norms (mean 1, standard deviation
    /// 0.3): the extras of Qwen2- and Qwen3-shaped test models.
    pub fn add_random_extras(&mut self, seed: u64, bias: [bool; 7], qk_norm: bool) {
        let mut r = crate::rng::Rng::new(seed ^ 0x5EED_B1A5);
        let a = 3f32.sqrt();
        let mut tensor = |n: usize, mu: f32, sigma: f32| -> Vec<f32> {
            (0..n).map(|_| mu + sigma * r.uniform_f32(-a, a)).collect()
        };
        let hd = self.dims.head_dim;
        for l in self.layers.iter_mut() {
            for (m, on) in bias.iter().enumerate() {
                l.bias[m] = on.then(|| tensor(self.dims.module_dims(m).1, 0.0, 0.5));
            }
            l.qk_norm = qk_norm.then(|| (tensor(hd, 1.0, 0.3), tensor(hd, 1.0, 0.3)));
        }
    }

    /// The weight matrices (projections, embedding, head: what [`Backend::upload_weight`] takes)
    /// rounded to bf16 and back, as a bf16 device holds them; norm weights stay f32.
    pub fn round_to_bf16(&mut self) {
        let r = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
        r(&mut self.embed);
        if let Some(h) = self.lm_head.as_mut() {
            r(h);
        }
        for l in self.layers.iter_mut() {
            l.proj.iter_mut().for_each(r);
        }
    }

    /// Takes the tensors of loaded weights (HF layout, q/k already un-permuted), without copying.
    ///
    /// Granite's scalars ([`crate::model::config::Multipliers`]) are folded into the frozen
    /// weights, which leaves Llama's block: the attention scale `a` into `q_proj` (rows and bias
    /// times `a sqrt(head_dim)`, since the kernels scale scores by `1 / sqrt(head_dim)`), the
    /// residual multiplier into `o_proj` and `down_proj` (and their biases), the embedding
    /// multiplier into `embed`, and `1 / logits_scaling` into the final norm (with a tied head
    /// also `1 / embedding`, undoing the embedding's factor in the head). Every one is exact for
    /// the adapter too: WeGeFT's update `W phi psi` scales with `W`, so `c (W + W phi psi)` is
    /// the folded weight's own adapted form (a Granite adapter trained here is the one
    /// transformers' Granite and the official code apply). `LlamaWeights` keep the file's
    /// values: a merge or an HF save of them is unfolded.
    pub fn from_llama(w: crate::model::LlamaWeights) -> Result<HostWeights> {
        let dims = Dims::from_config(&w.config);
        if let Some(l) = w.layers.iter().position(|l| l.q_norm.is_some() != l.k_norm.is_some()) {
            return Err(Error::invalid("weights", format!("layer {l} has one of q_norm and k_norm without the other")));
        }
        let multipliers = w.config.multipliers;
        let mut host = Self::unfolded(w, dims)?;
        if let Some(m) = multipliers {
            host.fold(&m);
        }
        Ok(host)
    }

    /// Multiplies the frozen weights by Granite's scalars (see [`HostWeights::from_llama`]).
    fn fold(&mut self, m: &crate::model::config::Multipliers) {
        let scale = |v: &mut [f32], c: f32| v.iter_mut().for_each(|x| *x *= c);
        let q_factor = m.attention * (self.dims.head_dim as f32).sqrt();
        for layer in &mut self.layers {
            for (i, c) in [(Q, q_factor), (O, m.residual), (DOWN, m.residual)] {
                scale(&mut layer.proj[i], c);
                if let Some(b) = &mut layer.bias[i] {
                    scale(b, c);
                }
            }
        }
        scale(&mut self.embed, m.embedding);
        let head = if self.lm_head.is_none() { m.embedding * m.logits_scaling } else { m.logits_scaling };
        scale(&mut self.final_norm, 1.0 / head);
    }

    /// The weights as the file holds them.
    fn unfolded(w: crate::model::LlamaWeights, dims: Dims) -> Result<HostWeights> {
        let layers = w
            .layers
            .into_iter()
            .map(|l| HostLayer {
                attn_norm: l.input_layernorm.data,
                mlp_norm: l.post_attention_layernorm.data,
                proj: [
                    l.q_proj.data,
                    l.k_proj.data,
                    l.v_proj.data,
                    l.o_proj.data,
                    l.gate_proj.data,
                    l.up_proj.data,
                    l.down_proj.data,
                ],
                bias: l.biases.map(|b| b.map(|t| t.data)),
                qk_norm: l.q_norm.zip(l.k_norm).map(|(q, k)| (q.data, k.data)),
            })
            .collect();
        Ok(HostWeights {
            dims,
            embed: w.embed_tokens.data,
            final_norm: w.norm.data,
            lm_head: w.lm_head.map(|t| t.data),
            layers,
        })
    }
}

impl HostAdapter {
    /// The model-side view of an adapter (its pairs in order, each site's pair, the scale).
    pub fn from_adapter(a: &crate::adapter::Adapter) -> Result<HostAdapter> {
        let mut sites = vec![[None; 7]; a.dims.n_layers];
        for (l, row) in sites.iter_mut().enumerate() {
            for m in crate::adapter::Module::ALL {
                row[m.index()] = a.pair_index(l, m)?;
            }
        }
        let pairs = a
            .pairs()
            .iter()
            .map(|p| {
                let (_, m) = *p
                    .sites
                    .first()
                    .ok_or_else(|| Error::invalid("adapter", format!("pair {} has no site", p.name)))?;
                Ok((m.index(), p.phi.clone(), p.psi.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(HostAdapter { rank: a.rank(), scale: a.scale(), pairs, sites, dropout: a.config.dropout })
    }

    /// Writes these values back into `a` (same layout: pairs in the same order).
    pub fn store_into(&self, a: &mut crate::adapter::Adapter) -> Result<()> {
        if a.pairs().len() != self.pairs.len() {
            return Err(Error::Len { arg: "adapter pairs", expected: a.pairs().len(), got: self.pairs.len() });
        }
        for (k, (_, phi, psi)) in self.pairs.iter().enumerate() {
            let (dphi, dpsi) = a.pair_values_mut(k)?;
            if dphi.len() != phi.len() || dpsi.len() != psi.len() {
                return Err(Error::invalid("adapter", format!("pair {k}: sizes differ")));
            }
            dphi.copy_from_slice(phi);
            dpsi.copy_from_slice(psi);
        }
        Ok(())
    }
}
