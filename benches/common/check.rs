//! What the GPU benchmarks share to check their results (`#[path]`-included by each).

/// Worst `|got - want| / max |want|` and its index; a NaN or infinity on either side (or a
/// length mismatch) is an infinite error, so it can never be skipped by a comparison.
pub fn rel_err(got: &[f32], want: &[f32]) -> (f64, usize) {
    if got.len() != want.len() {
        return (f64::INFINITY, 0);
    }
    let scale = want.iter().filter(|v| v.is_finite()).fold(0f64, |m, &v| m.max((v as f64).abs())).max(1e-30);
    let (mut worst, mut at) = (0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = if g.is_finite() && w.is_finite() { (g as f64 - w as f64).abs() / scale } else { f64::INFINITY };
        if e > worst {
            worst = e;
            at = i;
        }
    }
    (worst, at)
}
