//! Learning-rate schedules, as transformers' `get_scheduler` builds them: a `LambdaLR` that
//! multiplies the base learning rate by a factor of the number of optimiser steps already
//! taken, `c = 0, 1, ...` (the scheduler steps after the optimiser, so the `t`-th update, counted
//! from 1, uses `c = t - 1`), in f64 as Python computes it:
//!
//! ```text
//! warm-up (c < warmup):  c / max(1, warmup)
//! constant:              1
//! linear:                max(0, (total - c) / max(1, total - warmup))
//! cosine:                max(0, 0.5 (1 + cos(pi * 0.5 * 2 * (c - warmup) / max(1, total - warmup))))
//! ```
//!
//! (`get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup`,
//! `get_cosine_schedule_with_warmup` with `num_cycles = 0.5`.) With a warm-up the first update
//! has learning rate 0, as in transformers.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The shape of the schedule after the warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    #[default]
    Constant,
    Linear,
    Cosine,
}

impl ScheduleKind {
    /// Parses `constant`, `linear` or `cosine`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            other => Err(Error::invalid("lr schedule", format!("{other:?}: expected constant, linear or cosine"))),
        }
    }
}

/// A learning-rate schedule: its kind, warm-up steps and, for the decaying kinds, the total
/// number of steps it decays over (0 for a constant schedule, whose length does not matter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// A schedule of `kind` with `warmup` steps, over `total` steps in all (kept only for the
    /// decaying kinds). As in transformers, a warm-up may be longer than the run (which then
    /// never leaves it).
    pub fn new(kind: ScheduleKind, warmup: u64, total: u64) -> Self {
        let total_steps = if kind == ScheduleKind::Constant { 0 } else { total };
        LrSchedule { kind, warmup_steps: warmup, total_steps }
    }

    /// The factor of the learning rate at the `t`-th update (`t >= 1`).
    pub fn factor(&self, t: u64) -> f64 {
        let c = t.saturating_sub(1);
        let (w, n) = (self.warmup_steps, self.total_steps);
        if c < w {
            return c as f64 / w.max(1) as f64;
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => (0.0f64).max(n.saturating_sub(c) as f64 / (n.saturating_sub(w)).max(1) as f64),
            ScheduleKind::Cosine => {
                let progress = (c - w) as f64 / (n.saturating_sub(w)).max(1) as f64;
                (0.0f64).max(0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos()))
            }
        }
    }

    /// The learning rate of the `t`-th update for a base rate `lr`.
    pub fn lr(&self, lr: f64, t: u64) -> f64 {
        lr * self.factor(t)
    }
}
