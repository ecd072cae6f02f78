//! The training loop's core: one step = forward + backward over a batch (or over several,
//! their gradients accumulated as one batch's), the gradient optionally clipped to a global
//! norm, then AdamW on every adapter pair at the learning rate of the schedule. Deterministic:
//! the same model, adapter and batches give bitwise the same losses and parameters.

use crate::backend::{AdamHyper, Backend};
use crate::error::{Error, Result};
use crate::model::llama::{Adapter, Batch, HostAdapter, Llama};
use crate::train::optim::AdamWConfig;
use crate::train::schedule::LrSchedule;

/// What one update did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The mean loss over the labelled positions of all the step's batches, before the update.
    pub loss: f32,
    /// The global 2-norm of the gradient over every pair, before clipping (as transformers'
    /// Trainer logs `grad_norm`).
    pub grad_norm: f64,
    /// The learning rate of the update.
    pub lr: f64,
}

/// `Ok` for a clipping bound [`Trainer::with_max_grad_norm`] takes (finite and above 0), else
/// an error naming it `arg`.
pub fn check_max_grad_norm(arg: &'static str, max_norm: f64) -> Result<()> {
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return Err(Error::invalid(arg, format!("must be a finite number above 0, got {max_norm}")));
    }
    Ok(())
}

/// The mean next-token loss over every labelled position of `examples` (an evaluation set),
/// taken `batch` examples at a time in order, padded with `pad`, without weight dropout: the
/// loss of the whole set as one batch, up to the order of summation. Examples without a
/// labelled position count for nothing; a set with none at all is an error.
pub fn eval_loss<B: Backend>(
    be: &B,
    model: &Llama<B>,
    adapter: Option<&Adapter<B>>,
    examples: &[crate::train::data::Example],
    batch: usize,
    pad: u32,
) -> Result<f64> {
    if batch == 0 {
        return Err(Error::ZeroDim { what: "batch" });
    }
    let (mut sum, mut count) = (0.0f64, 0usize);
    for chunk in examples.chunks(batch) {
        let refs: Vec<&crate::train::data::Example> = chunk.iter().collect();
        let b = crate::train::data::make_batch(&refs, pad)?;
        let n = b.count();
        if n > 0 {
            sum += model.loss(be, adapter, &b)? as f64 * n as f64;
            count += n;
        }
    }
    if count == 0 {
        return Err(Error::invalid("evaluation data", "no labelled positions"));
    }
    Ok(sum / count as f64)
}

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
    schedule: LrSchedule,
    max_grad_norm: Option<f64>,
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
        Ok(Trainer { be, model, adapter, grads, m, v, step: 0, optim, schedule: LrSchedule::default(), max_grad_norm: None, seed: 0 })
    }

    /// The learning-rate schedule (default: constant, no warm-up).
    pub fn with_schedule(mut self, schedule: LrSchedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Clips the gradient to a global 2-norm of `max_norm` before each update, as
    /// `torch.nn.utils.clip_grad_norm_` does: every gradient times
    /// `min(1, max_norm / (norm + 1e-6))`. `max_norm` must be finite and above 0.
    pub fn with_max_grad_norm(mut self, max_norm: f64) -> Result<Self> {
        check_max_grad_norm("max_grad_norm", max_norm)?;
        self.max_grad_norm = Some(max_norm);
        Ok(self)
    }

    /// The seed of the weight-dropout masks (step `t` uses masks from a mix of `seed` and `t`;
    /// default 0). Only matters with an adapter dropout above 0.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// One step on `batch`: returns the loss *before* the update (mean over the batch's
    /// labelled tokens, with this step's weight dropout if any), then applies AdamW to every
    /// pair. A non-finite loss or gradient is an [`Error::Numerical`] naming the step (counted
    /// from 1); the adapter and the optimiser state are then left as they were. An update that
    /// makes a parameter non-finite is the same error, but the trainer is then spent: continue
    /// from the last checkpoint.
    pub fn step(&mut self, batch: &Batch) -> Result<f32> {
        Ok(self.step_many(std::slice::from_ref(batch))?.loss)
    }

    /// One update from several batches (gradient accumulation): the gradient is that of the
    /// mean loss over all their labelled positions, as if they were one batch, with one weight
    /// dropout mask for all of them. A batch without a labelled position adds nothing; batches
    /// without any at all are an error. Then clipping (if set), then AdamW at the schedule's
    /// learning rate. Errors as [`Trainer::step`].
    pub fn step_many(&mut self, batches: &[Batch]) -> Result<StepStats> {
        if batches.is_empty() {
            return Err(Error::invalid("batches", "a step needs at least one batch"));
        }
        self.adapter.dropout_seed =
            crate::train::arithmetic::SplitMix::new(self.seed ^ (self.step + 1).wrapping_mul(0xA076_1D64_78BD_642F))
                .next_u64();
        for (dphi, dpsi) in self.grads.iter_mut() {
            self.be.fill_zero(dphi)?;
            self.be.fill_zero(dpsi)?;
        }
        let total: usize = batches.iter().map(Batch::count).sum();
        if total == 0 {
            return Err(Error::invalid("batches", "no labelled positions"));
        }
        let mut sum = 0.0f64;
        // A batch without a labelled position adds nothing (its examples' answers were cut off).
        for b in batches.iter().filter(|b| b.count() > 0) {
            let loss = self.model.loss_and_grad_over(self.be, &self.adapter, b, &mut self.grads, total)?;
            sum += loss as f64 * b.count() as f64;
        }
        // One batch: its own mean (the f64 round trip is exact).
        let loss = (sum / total as f64) as f32;
        if !loss.is_finite() {
            return Err(Error::Numerical(format!("loss is {loss} at step {}", self.step + 1)));
        }
        // A non-finite gradient would poison the moments and then every parameter: stop
        // before the update, with the adapter and the optimiser state of the last good step.
        let mut host = Vec::with_capacity(self.grads.len());
        for (k, (dphi, dpsi)) in self.grads.iter().enumerate() {
            let pair = (self.be.download(dphi)?, self.be.download(dpsi)?);
            for (what, g) in [("dphi", &pair.0), ("dpsi", &pair.1)] {
                if let Some(i) = g.iter().position(|x| !x.is_finite()) {
                    return Err(Error::Numerical(format!(
                        "{what} of pair {k} ({}) has the non-finite element {} at index {i} at step {}",
                        crate::model::llama::MODULES[self.adapter.pairs[k].module],
                        g[i],
                        self.step + 1
                    )));
                }
            }
            host.push(pair);
        }
        let grad_norm = host.iter().flat_map(|(a, b)| a.iter().chain(b)).map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        if let Some(max) = self.max_grad_norm {
            let coef = max / (grad_norm + 1e-6);
            if coef < 1.0 {
                let c = coef as f32;
                for ((dphi, dpsi), (a, b)) in self.grads.iter_mut().zip(host) {
                    *dphi = self.be.upload_vec(a.into_iter().map(|x| x * c).collect())?;
                    *dpsi = self.be.upload_vec(b.into_iter().map(|x| x * c).collect())?;
                }
            }
        }
        self.step += 1;
        let o = self.optim;
        let lr = self.schedule.lr(o.lr, self.step);
        let hyper = AdamHyper {
            lr,
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
        for (k, pair) in self.adapter.pairs.iter().enumerate() {
            for (what, p) in [("phi", &pair.phi), ("psi", &pair.psi)] {
                let host = self.be.download(p)?;
                if let Some(i) = host.iter().position(|x| !x.is_finite()) {
                    return Err(Error::Numerical(format!(
                        "the update of step {} made {what} of pair {k} ({}) non-finite ({} at index {i}); lower the learning rate or weight decay",
                        self.step,
                        crate::model::llama::MODULES[pair.module],
                        host[i]
                    )));
                }
            }
        }
        Ok(StepStats { loss, grad_norm, lr })
    }

    /// A trainer that continues a run: the adapter `params` (as uploaded by [`Trainer::new`]
    /// from `init`, whose values are replaced), and the AdamW state after `step` steps: first
    /// moments `m` and second moments `v`, `(phi, psi)` per pair, as [`Trainer::optimizer_state`]
    /// returned them. Every length must match the pairs of `init`.
    pub fn resume(
        be: &'m B,
        model: &'m Llama<B>,
        init: &HostAdapter,
        optim: AdamWConfig,
        step: u64,
        m: &[(Vec<f32>, Vec<f32>)],
        v: &[(Vec<f32>, Vec<f32>)],
    ) -> Result<Self> {
        let mut t = Self::new(be, model, init, optim)?;
        for (arg, state) in [("m", m), ("v", v)] {
            if state.len() != init.pairs.len() {
                return Err(Error::Len { arg, expected: init.pairs.len(), got: state.len() });
            }
            for (k, ((_, phi, psi), (a, b))) in init.pairs.iter().zip(state).enumerate() {
                if a.len() != phi.len() || b.len() != psi.len() {
                    return Err(Error::invalid(
                        arg,
                        format!(
                            "pair {k}: ({}, {}) elements, the adapter has ({}, {})",
                            a.len(),
                            b.len(),
                            phi.len(),
                            psi.len()
                        ),
                    ));
                }
            }
        }
        for (k, (a, b)) in m.iter().enumerate() {
            t.m[k] = (be.upload(a)?, be.upload(b)?);
        }
        for (k, (a, b)) in v.iter().enumerate() {
            t.v[k] = (be.upload(a)?, be.upload(b)?);
        }
        t.step = step;
        Ok(t)
    }

    /// The AdamW state on the host: `(step, m, v)`, moments as `(phi, psi)` per pair.
    #[allow(clippy::type_complexity)]
    pub fn optimizer_state(&self) -> Result<(u64, Vec<(Vec<f32>, Vec<f32>)>, Vec<(Vec<f32>, Vec<f32>)>)> {
        let get = |s: &Vec<(B::Buf, B::Buf)>| -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
            s.iter().map(|(a, b)| Ok((self.be.download(a)?, self.be.download(b)?))).collect()
        };
        Ok((self.step, get(&self.m)?, get(&self.v)?))
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
    /// The gradients of the last step (`(dphi, dpsi)` per pair; clipped, where clipping is on
    /// and the norm was above the bound), on the host.
    pub fn last_grads(&self) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        self.grads.iter().map(|(a, b)| Ok((self.be.download(a)?, self.be.download(b)?))).collect()
    }
}
