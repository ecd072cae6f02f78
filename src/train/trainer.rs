//! The training loop's core: one step = forward + backward over a batch, then AdamW on every
//! adapter pair. Deterministic: the same model, adapter and batches give bitwise the same
//! losses and parameters.

use crate::backend::{AdamHyper, Backend};
use crate::error::{Error, Result};
use crate::model::llama::{Adapter, Batch, HostAdapter, Llama};
use crate::train::optim::AdamWConfig;

/// Trains an adapter on a frozen model.
pub struct Trainer<'m, B: Backend> {
    be: &'m B,
    model: &'m Llama<B>,
    adapter: Adapter<B>,
    grads: Vec<(B::Buf, B::Buf)>,
    m: Vec<(B::Buf, B::Buf)>,
    v: Vec<(B::Buf, B::Buf)>,
    step: u64,
    optim: AdamWConfig,
    seed: u64,
}

impl<'m, B: Backend> Trainer<'m, B> {
    /// A trainer starting from `init` (uploaded to the backend), with zero AdamW moments.
    pub fn new(be: &'m B, model: &'m Llama<B>, init: &HostAdapter, optim: AdamWConfig) -> Result<Self> {
        optim.validate()?;
        let adapter = init.upload(be, &model.dims)?;
        let grads = adapter.zero_grads(be)?;
        let m = adapter.zero_grads(be)?;
        let v = adapter.zero_grads(be)?;
        Ok(Trainer { be, model, adapter, grads, m, v, step: 0, optim, seed: 0 })
    }

    /// The seed of the weight-dropout masks (step `t` uses masks from a mix of `seed` and `t`;
    /// default 0). Only matters with an adapter dropout above 0.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// One step on `batch`: returns the loss *before* the update (mean over the batch's
    /// labelled tokens, with this step's weight dropout if any), then applies AdamW to every
    /// pair.
    pub fn step(&mut self, batch: &Batch) -> Result<f32> {
        self.adapter.dropout_seed =
            crate::train::arithmetic::SplitMix::new(self.seed ^ (self.step + 1).wrapping_mul(0xA076_1D64_78BD_642F))
                .next_u64();
        for (dphi, dpsi) in self.grads.iter_mut() {
            self.be.fill_zero(dphi)?;
            self.be.fill_zero(dpsi)?;
        }
        let loss = self.model.loss_and_grad(self.be, &self.adapter, batch, &mut self.grads)?;
        if !loss.is_finite() {
            return Err(Error::Numerical(format!("loss is {loss} at step {}", self.step + 1)));
        }
        self.step += 1;
        let o = self.optim;
        let hyper = AdamHyper {
            lr: o.lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            step: self.step,
        };
        for (((pair, g), m), v) in
            self.adapter.pairs.iter_mut().zip(&self.grads).zip(self.m.iter_mut()).zip(self.v.iter_mut())
        {
            self.be.adamw_step(&mut pair.phi, &g.0, &mut m.0, &mut v.0, hyper)?;
            self.be.adamw_step(&mut pair.psi, &g.1, &mut m.1, &mut v.1, hyper)?;
        }
        Ok(loss)
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }
    /// The adapter on the backend (for evaluation between steps).
    pub fn adapter(&self) -> &Adapter<B> {
        &self.adapter
    }
    /// The current adapter, on the host.
    pub fn host_adapter(&self) -> Result<HostAdapter> {
        self.adapter.download(self.be)
    }
    /// The gradients of the last step (`(dphi, dpsi)` per pair), on the host.
    pub fn last_grads(&self) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        self.grads.iter().map(|(a, b)| Ok((self.be.download(a)?, self.be.download(b)?))).collect()
    }
}
