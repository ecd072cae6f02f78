//! AdamW with exactly `torch.optim.AdamW`'s update (single-tensor CPU path, no amsgrad, not
//! maximising), over f32 parameter slices.
//!
//! For step `t = 1, 2, ...`, each parameter `p` with gradient `g` (f32 arithmetic in torch's
//! order; scalars computed in f64 as Python does, then rounded to f32):
//!
//! ```text
//! p   <- p * (1 - lr * wd)                       decoupled weight decay, first
//! m   <- m + (1 - b1) * (g - m)                  torch: exp_avg.lerp_(g, 1 - b1)
//! v   <- v * b2 + ((1 - b2) * g) * g             torch: exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
//! bc1 = 1 - b1^t,  bc2 = 1 - b2^t                (f64)
//! denom = sqrt(v) / sqrt(bc2) + eps
//! p   <- p + (-(lr / bc1)) * (m / denom)         torch: p.addcdiv_(m, denom, value=-lr/bc1)
//! ```

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Hyper-parameters, defaults as `torch.optim.AdamW`: lr 1e-3, betas (0.9, 0.999), eps 1e-8,
/// weight_decay 0.01.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

impl AdamWConfig {
    /// Checks the ranges torch checks: `lr >= 0`, `eps >= 0`, `0 <= beta < 1`, `wd >= 0`.
    pub fn validate(&self) -> Result<()> {
        let finite = |v: f64| v.is_finite();
        if !(self.lr >= 0.0) || !finite(self.lr) {
            return Err(Error::invalid("lr", format!("must be a finite number >= 0, got {}", self.lr)));
        }
        if !(self.eps >= 0.0) || !finite(self.eps) {
            return Err(Error::invalid("eps", format!("must be a finite number >= 0, got {}", self.eps)));
        }
        for (arg, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(arg, format!("must be in [0, 1), got {b}")));
            }
        }
        if !(self.weight_decay >= 0.0) || !finite(self.weight_decay) {
            return Err(Error::invalid("weight_decay", format!("must be a finite number >= 0, got {}", self.weight_decay)));
        }
        Ok(())
    }
}

/// The optimiser and its state: first and second moments per parameter tensor and the step
/// count (shared by all tensors, as they are always stepped together). Serialisable with serde
/// for checkpoints, or with [`AdamW::save`] / [`AdamW::load`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken so far (torch's `state["step"]`).
    pub step: u64,
    /// `exp_avg`, one vector per parameter tensor.
    pub m: Vec<Vec<f32>>,
    /// `exp_avg_sq`, one vector per parameter tensor.
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// A fresh optimiser (zero moments, step 0) for parameter tensors of the given lengths.
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Result<Self> {
        config.validate()?;
        Ok(AdamW {
            config,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        })
    }

    /// Sets the learning rate (for schedules); takes effect from the next step.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        let c = AdamWConfig { lr, ..self.config };
        c.validate()?;
        self.config = c;
        Ok(())
    }

    /// One update of every tensor: `params[i]` with gradient `grads[i]` (see the module docs for
    /// the formula). Lengths must match the sizes given to [`AdamW::new`]; a mismatch changes
    /// nothing and returns an error.
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]]) -> Result<()> {
        if params.len() != self.m.len() {
            return Err(Error::Len { arg: "params", expected: self.m.len(), got: params.len() });
        }
        if grads.len() != self.m.len() {
            return Err(Error::Len { arg: "grads", expected: self.m.len(), got: grads.len() });
        }
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let n = self.m[i].len();
            if p.len() != n || g.len() != n {
                return Err(Error::invalid(
                    "params",
                    format!("tensor {i}: optimiser state has {n} elements, param {} and grad {}", p.len(), g.len()),
                ));
            }
        }
        self.step += 1;
        let c = self.config;
        let t = self.step.min(i32::MAX as u64) as i32;
        let decay = (1.0 - c.lr * c.weight_decay) as f32;
        let w1 = (1.0 - c.beta1) as f32;
        let b2 = c.beta2 as f32;
        let w2 = (1.0 - c.beta2) as f32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let step_size = -(c.lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = c.eps as f32;
        let wd = c.weight_decay != 0.0;
        for ((p, g), (m, v)) in params.iter_mut().zip(grads).zip(self.m.iter_mut().zip(self.v.iter_mut())) {
            for j in 0..p.len() {
                let gj = g[j];
                let mut pj = p[j];
                if wd {
                    pj *= decay;
                }
                let mj = m[j] + w1 * (gj - m[j]);
                let vj = v[j] * b2 + (w2 * gj) * gj;
                let denom = vj.sqrt() / bc2_sqrt + eps;
                p[j] = pj + step_size * (mj / denom);
                m[j] = mj;
                v[j] = vj;
            }
        }
        Ok(())
    }

    /// Writes the state atomically (temp file, fsync, rename) as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self).map_err(|e| Error::format(path, format!("serialising AdamW state: {e}")))?;
        crate::adapter::io::write_atomic(path, &bytes)
    }

    /// Reads a state written by [`AdamW::save`], checking that the moments are consistent.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let s: AdamW = serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("AdamW state: {e}")))?;
        s.config.validate().map_err(|e| Error::format(path, format!("AdamW config: {e}")))?;
        if s.m.len() != s.v.len() || s.m.iter().zip(&s.v).any(|(a, b)| a.len() != b.len()) {
            return Err(Error::format(path, "AdamW state: m and v have different shapes"));
        }
        Ok(s)
    }
}

/// Gradient-norm clipping as `torch.nn.utils.clip_grad_norm_` (L2, `foreach=False`): with
/// `total = sqrt(sum_i ||g_i||^2)` over all tensors and `coef = max_norm / (total + 1e-6)`,
/// every gradient is multiplied by `coef` when `coef < 1`. Returns `total` (before clipping).
/// A non-finite total is an error (nothing is changed), as with `error_if_nonfinite=True`.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> Result<f32> {
    if !(max_norm > 0.0) || !max_norm.is_finite() {
        return Err(Error::invalid("max_norm", format!("must be a positive finite number, got {max_norm}")));
    }
    let sq: f64 = grads.iter().flat_map(|g| g.iter()).map(|&x| (x as f64) * (x as f64)).sum();
    let total = sq.sqrt() as f32;
    if !total.is_finite() {
        return Err(Error::Numerical(format!("gradient norm is {total}")));
    }
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            g.iter_mut().for_each(|x| *x *= coef);
        }
    }
    Ok(total)
}
