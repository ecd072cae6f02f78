//! RoPE's rotation frequencies: the base `theta` and the scalings Llama-family models use.
//!
//! Row `t` of a query or key head, at position `p`, rotates its pairs `(x_i, x_{i+hd/2})` by
//! the angle `p * inv_freq[i]` (`i < hd/2`, `hd` the head width). [`Rope::inv_freq`] computes
//! `inv_freq` in f32 with transformers' operations, in transformers' order:
//!
//! * no scaling: `inv_freq[i] = 1 / theta^(2i/hd)`;
//! * [`RopeScaling::Linear`] (HF `rope_type: "linear"`, GGUF `rope.scaling.type = linear`):
//!   `inv_freq[i] / factor`;
//! * [`RopeScaling::Llama3`] (HF `rope_type: "llama3"`, Llama 3.1 and later): with
//!   `wavelen = 2 pi / inv_freq[i]`, frequencies whose wavelength is shorter than
//!   `original_max_position_embeddings / high_freq_factor` stay, those longer than
//!   `original_max_position_embeddings / low_freq_factor` are divided by `factor`, and those in
//!   between are interpolated: with `s = (original / wavelen - low) / (high - low)`,
//!   `(1 - s) inv_freq / factor + s inv_freq`;
//! * [`RopeScaling::FreqFactors`] (a GGUF `rope_freqs.weight` tensor, which llama.cpp's
//!   converter writes for Llama 3.1 and later): `inv_freq[i] / factors[i]`, as llama.cpp applies
//!   it. The converter's factors are the Llama 3 rule's ratios, so a GGUF and its HF original
//!   rotate alike (to f32 rounding).
//!
//! Other scalings (YaRN, dynamic NTK, LongRoPE) are refused when a config is read.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How RoPE's frequencies are scaled from the plain `1 / theta^(2i/hd)`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// The plain frequencies.
    #[default]
    None,
    /// Linear position interpolation: every frequency divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1's rule (see the module docs), with HF's parameter names.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: usize },
    /// One divisor per frequency (`hd/2` of them), as a GGUF's `rope_freqs.weight` holds them.
    FreqFactors(Vec<f32>),
}

/// RoPE's base and scaling: everything that decides the rotation angles.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    /// The base `theta` (`rope_theta`, GGUF `rope.freq_base`).
    pub theta: f32,
    /// The scaling of the frequencies.
    pub scaling: RopeScaling,
}

impl Rope {
    /// Plain RoPE with base `theta`.
    pub fn new(theta: f32) -> Self {
        Rope { theta, scaling: RopeScaling::None }
    }

    /// The same base with `scaling`.
    pub fn with_scaling(self, scaling: RopeScaling) -> Self {
        Rope { scaling, ..self }
    }

    /// Checks `theta` and the scaling's parameters for heads of width `head_dim` (even,
    /// positive): every factor finite and positive, `high_freq_factor > low_freq_factor`,
    /// `hd/2` frequency factors. The error is a message naming the parameter.
    pub fn check(&self, head_dim: usize) -> std::result::Result<(), String> {
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!("head_dim {head_dim} must be even and positive for RoPE"));
        }
        let positive = |name: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} {v} must be finite and positive"))
            }
        };
        positive("rope_theta", self.theta)?;
        match &self.scaling {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } => positive("rope scaling factor", *factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                positive("rope scaling factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("high_freq_factor", *high_freq_factor)?;
                if !(high_freq_factor > low_freq_factor) {
                    return Err(format!(
                        "high_freq_factor {high_freq_factor} must exceed low_freq_factor {low_freq_factor}"
                    ));
                }
                if *original_max_position_embeddings == 0 {
                    return Err("original_max_position_embeddings must be positive".into());
                }
                Ok(())
            }
            RopeScaling::FreqFactors(f) => {
                if f.len() != head_dim / 2 {
                    return Err(format!(
                        "rope_freqs has {} factors; heads of width {head_dim} need {}",
                        f.len(),
                        head_dim / 2
                    ));
                }
                for (i, &v) in f.iter().enumerate() {
                    positive(&format!("rope_freqs[{i}]"), v)?;
                }
                Ok(())
            }
        }
    }

    /// `inv_freq[i]`, `i < head_dim / 2` (see the module docs). Bad parameters (see
    /// [`Rope::check`]) are an [`Error::Invalid`] on `rope`.
    pub fn inv_freq(&self, head_dim: usize) -> Result<Vec<f32>> {
        self.check(head_dim).map_err(|m| Error::invalid("rope", m))?;
        let half = head_dim / 2;
        // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all f32.
        let plain = (0..half).map(|i| 1.0f32 / self.theta.powf((2 * i) as f32 / head_dim as f32));
        Ok(match &self.scaling {
            RopeScaling::None => plain.collect(),
            RopeScaling::Linear { factor } => plain.map(|f| f / factor).collect(),
            RopeScaling::FreqFactors(ff) => plain.zip(ff).map(|(f, d)| f / d).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                // As transformers' _compute_llama3_parameters, on f32 tensors: Python scalars
                // (the wavelength bounds, high - low) are computed in f64 and meet the tensors
                // as f32.
                let old = *original_max_position_embeddings as f64;
                let (lo, hi) = (*low_freq_factor as f64, *high_freq_factor as f64);
                let low_wavelen = (old / lo) as f32;
                let high_wavelen = (old / hi) as f32;
                let span = (hi - lo) as f32;
                let two_pi = (2.0 * std::f64::consts::PI) as f32;
                plain
                    .map(|f| {
                        let wavelen = two_pi / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let s = (old as f32 / wavelen - *low_freq_factor) / span;
                            (1.0 - s) * f / factor + s * f
                        }
                    })
                    .collect()
            }
        })
    }

    /// Reads HF's `rope_scaling` (or transformers 5's `rope_parameters`) object: `null`,
    /// `rope_type` (or the older `type`) `"default"`, `"linear"` with `factor`, or `"llama3"` with
    /// `factor`, `low_freq_factor`, `high_freq_factor` and `original_max_position_embeddings`
    /// (which falls back to `max_position_embeddings`, as in transformers). Any other type is an
    /// error naming it.
    pub fn scaling_from_hf(
        v: &serde_json::Value,
        max_position_embeddings: Option<usize>,
    ) -> std::result::Result<RopeScaling, String> {
        if v.is_null() {
            return Ok(RopeScaling::None);
        }
        let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
        let num = |key: &str| -> std::result::Result<f32, String> {
            v.get(key)
                .and_then(|x| x.as_f64())
                .map(|x| x as f32)
                .ok_or_else(|| format!("rope_type {kind:?} needs a number {key:?} in {v}"))
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
            "llama3" => {
                let original = match v.get("original_max_position_embeddings") {
                    Some(x) => x
                        .as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| format!("original_max_position_embeddings {x} is not a whole number"))?,
                    None => max_position_embeddings
                        .ok_or("rope_type \"llama3\" needs original_max_position_embeddings")?,
                };
                Ok(RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: original,
                })
            }
            other => Err(format!(
                "rope_type {other:?} is not supported (supported: default, linear, llama3): {v}"
            )),
        }
    }

    /// The HF `rope_scaling` object for this scaling (`null` for none), for a `config.json`.
    /// Frequency factors (from a GGUF) are written as the `llama3` parameters they were made
    /// from when [`Rope::llama3_from_factors`] recovers them; otherwise HF has no way to say
    /// them and this is an error.
    pub fn hf_scaling(&self, head_dim: usize) -> std::result::Result<serde_json::Value, String> {
        Ok(match &self.scaling {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": *factor as f64}),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                serde_json::json!({
                    "rope_type": "llama3",
                    "factor": *factor as f64,
                    "low_freq_factor": *low_freq_factor as f64,
                    "high_freq_factor": *high_freq_factor as f64,
                    "original_max_position_embeddings": original_max_position_embeddings,
                })
            }
            RopeScaling::FreqFactors(_) => match self.llama3_from_factors(head_dim) {
                Some(l3) => Rope { theta: self.theta, scaling: l3 }.hf_scaling(head_dim)?,
                None => {
                    return Err(
                        "the RoPE frequency factors (GGUF rope_freqs) do not follow Llama 3's rule, so no HF rope_scaling can express them"
                            .into(),
                    )
                }
            },
        })
    }

    /// The Llama 3 parameters that frequency factors were made from, if they were: `factor` is
    /// the largest factor; the factors between 1 and it pin `original_max_position_embeddings`
    /// and `high_freq_factor` given `low_freq_factor = 1` (Llama 3.1's value; with fewer than two
    /// such factors, Llama 3.1's `high_freq_factor = 4` and 8192 positions are tried). The
    /// answer is accepted only if it reproduces every frequency to 1e-5 relative.
    pub fn llama3_from_factors(&self, head_dim: usize) -> Option<RopeScaling> {
        let RopeScaling::FreqFactors(ff) = &self.scaling else { return None };
        self.check(head_dim).ok()?;
        let factor = ff.iter().cloned().fold(1.0f32, f32::max);
        let plain = Rope::new(self.theta).inv_freq(head_dim).ok()?;
        let candidate = if factor <= 1.0 {
            None
        } else {
            // A middle factor d gives s = (1/d - 1/factor) / (1 - 1/factor) = a inv_freq + b with
            // a = original / (2 pi (high - low)), b = -low / (high - low).
            let mids: Vec<(f64, f64)> = plain
                .iter()
                .zip(ff)
                .filter(|(_, &d)| d > 1.0 + 1e-6 && d < factor * (1.0 - 1e-6))
                .map(|(&f, &d)| {
                    let inv_f = 1.0 / factor as f64;
                    (f as f64, (1.0 / d as f64 - inv_f) / (1.0 - inv_f))
                })
                .collect();
            if mids.len() >= 2 {
                let ((x0, y0), (x1, y1)) = (mids[0], mids[mids.len() - 1]);
                let a = (y1 - y0) / (x1 - x0);
                let b = y0 - a * x0;
                let low = 1.0f64;
                let high = low - low / b;
                let original = a * 2.0 * std::f64::consts::PI * (high - low);
                (b < 0.0 && original.is_finite() && original >= 1.0).then(|| RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low as f32,
                    high_freq_factor: (high * 1e4).round() as f32 / 1e4,
                    original_max_position_embeddings: original.round() as usize,
                })
            } else {
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                })
            }
        }?;
        let want = self.inv_freq(head_dim).ok()?;
        let got = Rope { theta: self.theta, scaling: candidate.clone() }.inv_freq(head_dim).ok()?;
        want.iter().zip(&got).all(|(w, g)| ((w - g) / w).abs() <= 1e-5).then_some(candidate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama31() -> Rope {
        Rope::new(500000.0).with_scaling(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        })
    }

    /// llama.cpp's converter: factor 1 (short wavelengths), `factor` (long ones),
    /// `1 / ((1 - s) / factor + s)` between.
    fn converter_factors(theta: f32, hd: usize, factor: f32, lo: f32, hi: f32, old: f32) -> Vec<f32> {
        Rope::new(theta)
            .inv_freq(hd)
            .unwrap()
            .iter()
            .map(|&f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < old / hi {
                    1.0
                } else if wavelen > old / lo {
                    factor
                } else {
                    let s = (old / wavelen - lo) / (hi - lo);
                    1.0 / ((1.0 - s) / factor + s)
                }
            })
            .collect()
    }

    #[test]
    fn llama3_keeps_high_divides_low_and_interpolates_between() {
        let plain = Rope::new(500000.0).inv_freq(128).unwrap();
        let l3 = llama31().inv_freq(128).unwrap();
        assert_eq!(l3[0], plain[0]);
        assert_eq!(l3[63], plain[63] / 8.0);
        let mid: Vec<usize> = (0..64).filter(|&i| l3[i] != plain[i] && l3[i] != plain[i] / 8.0).collect();
        assert!(!mid.is_empty());
        for i in mid {
            assert!(l3[i] < plain[i] && l3[i] > plain[i] / 8.0, "{i}");
        }
    }

    #[test]
    fn gguf_factors_rotate_like_the_llama3_parameters_they_came_from() {
        let ff = converter_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192.0);
        let g = Rope::new(500000.0).with_scaling(RopeScaling::FreqFactors(ff));
        let (a, b) = (g.inv_freq(128).unwrap(), llama31().inv_freq(128).unwrap());
        for (x, y) in a.iter().zip(&b) {
            assert!(((x - y) / y).abs() < 1e-6, "{x} {y}");
        }
        assert_eq!(g.llama3_from_factors(128), Some(llama31().scaling));
        let other = converter_factors(10000.0, 64, 32.0, 1.0, 3.0, 256.0);
        let g = Rope::new(10000.0).with_scaling(RopeScaling::FreqFactors(other));
        let back = g.llama3_from_factors(64).expect("recovered");
        assert_eq!(
            back,
            RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 3.0,
                original_max_position_embeddings: 256
            }
        );
        let mut odd = vec![1.0f32; 32];
        odd[3] = 2.5;
        odd[9] = 1.1;
        let g = Rope::new(10000.0).with_scaling(RopeScaling::FreqFactors(odd));
        assert_eq!(g.llama3_from_factors(64), None);
        assert!(g.hf_scaling(64).is_err());
    }

    #[test]
    fn hf_scaling_round_trips_and_bad_parameters_are_refused() {
        for r in [llama31(), Rope::new(10000.0).with_scaling(RopeScaling::Linear { factor: 2.0 }), Rope::new(1e4)] {
            let v = r.hf_scaling(64).unwrap();
            assert_eq!(Rope::scaling_from_hf(&v, None).unwrap(), r.scaling);
        }
        let v = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(Rope::scaling_from_hf(&v, None).unwrap_err().contains("yarn"));
        let v = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0});
        assert!(Rope::scaling_from_hf(&v, None).is_err());
        assert_eq!(
            Rope::scaling_from_hf(&v, Some(2048)).unwrap(),
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 2048
            }
        );
        assert!(Rope::new(1e4).with_scaling(RopeScaling::Linear { factor: 0.0 }).inv_freq(8).is_err());
        assert!(Rope::new(1e4).with_scaling(RopeScaling::FreqFactors(vec![1.0; 3])).inv_freq(8).is_err());
        assert!(Rope::new(-1.0).inv_freq(8).is_err());
        assert!(Rope::new(1e4).inv_freq(7).is_err());
        let bad = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 4.0,
            high_freq_factor: 1.0,
            original_max_position_embeddings: 8192,
        };
        assert!(Rope::new(1e4).with_scaling(bad).inv_freq(8).is_err());
    }
}
