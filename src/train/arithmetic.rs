//! The built-in `arithmetic` task: 3-digit additions ("What is 345 + 678?") as chat
//! prompts, the answer ("1023") as the completion.
//!
//! Every pair `(a, b)`, `100 <= a, b <= 999`, belongs to exactly one split, decided by a
//! hash of the pair: about 1 in 8 pairs is held out. Train and held-out problems are drawn
//! (seeded, with replacement within a split) only from their own split, so the splits never
//! share a problem.

use crate::error::{Error, Result};

/// A small deterministic generator (splitmix64).
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`; the modulo bias is below 2^-50 for the sizes used here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Which split a problem belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
}

/// The split of the pair `(a, b)`: held out when a fixed hash of the pair is 0 mod 8.
pub fn split_of(a: u32, b: u32) -> Split {
    let mut h = SplitMix::new(((a as u64) << 32) | b as u64 ^ 0xA5A5_0000_1234);
    if h.next_u64() % 8 == 0 {
        Split::HeldOut
    } else {
        Split::Train
    }
}

/// One addition problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub a: u32,
    pub b: u32,
}

impl Problem {
    /// The user's question: `What is {a} + {b}?`.
    pub fn question(&self) -> String {
        format!("What is {} + {}?", self.a, self.b)
    }
    /// The expected answer: the sum in decimal.
    pub fn answer(&self) -> String {
        (self.a + self.b).to_string()
    }
}

/// `n` problems of `split`, drawn with the generator seeded by `seed` (different streams for
/// the two splits).
pub fn problems(split: Split, seed: u64, n: usize) -> Result<Vec<Problem>> {
    if n == 0 {
        return Err(Error::ZeroDim { what: "problems" });
    }
    let stream = match split {
        Split::Train => 0x7261_696E,
        Split::HeldOut => 0x6865_6C64,
    };
    let mut rng = SplitMix::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ stream);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let a = 100 + rng.below(900) as u32;
        let b = 100 + rng.below(900) as u32;
        if split_of(a, b) == split {
            out.push(Problem { a, b });
        }
    }
    Ok(out)
}

/// Whether a generated answer is an exact match: the text up to the end of turn, trimmed,
/// equals the sum.
pub fn is_correct(p: &Problem, generated: &str) -> bool {
    generated.trim() == p.answer()
}
