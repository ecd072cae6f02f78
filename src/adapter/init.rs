//! Initialisation of a pair. With `U(d) = uniform(-1/sqrt(d), 1/sqrt(d))` — `nn.Linear`'s
//! default `kaiming_uniform_(a=sqrt(5))`, whose bound is `gain * sqrt(3 / fan_in)` with
//! `gain = sqrt(2 / (1 + 5)) `, i.e. `1/sqrt(fan_in)`:
//!
//! * [`Init::Gift`] (official code): `in_proj = nn.Linear(d_in, r)` keeps its default init, so
//!   `phi^T` (`r x d_in`, fan-in `d_in`) ~ `U(d_in)`; `out_proj` is zeroed, so `psi = 0`.
//! * [`Init::Peft`] (PEFT fork, `reset_wegeft_parameters`): `wegeft_psi.weight` (`r x d_in`, which
//!   is `psi`) ~ `kaiming_uniform_(a=sqrt(5))` = `U(d_in)`; `wegeft_phi.weight` (`phi^T`) = 0.
//!
//! Either way `phi psi = 0`: the adapted model starts equal to the base model. Values come from
//! [`crate::rng::Rng`] (same distribution as PyTorch, not the same stream).

use super::config::Init;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// `(phi (d_in x r), psi (r x d_in))` for one pair, drawing from `rng` in the row-major order
/// of the PyTorch weight that is random (`in_proj.weight` or `wegeft_psi.weight`, `r x d_in`).
pub fn init_pair(init: Init, d_in: usize, rank: usize, rng: &mut Rng) -> Result<(Vec<f32>, Vec<f32>)> {
    if d_in == 0 {
        return Err(Error::ZeroDim { what: "d_in" });
    }
    if rank == 0 {
        return Err(Error::ZeroDim { what: "rank" });
    }
    crate::shape::checked_len("phi", d_in, rank)?;
    let bound = 1.0 / (d_in as f32).sqrt();
    let mut phi = vec![0.0f32; d_in * rank];
    let mut psi = vec![0.0f32; rank * d_in];
    match init {
        Init::Gift => {
            // in_proj.weight[k][j] = phi[j][k]
            for k in 0..rank {
                for j in 0..d_in {
                    phi[j * rank + k] = rng.uniform_f32(-bound, bound);
                }
            }
        }
        Init::Peft => {
            for v in psi.iter_mut() {
                *v = rng.uniform_f32(-bound, bound);
            }
        }
    }
    Ok((phi, psi))
}
