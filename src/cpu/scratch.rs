//! Reusable `f32` scratch buffers, kept per thread.
//!
//! The layer converts half-precision operands into `f32` scratch and keeps small `T x r`
//! intermediates. Freshly allocating megabytes on every call costs more than the conversion
//! itself: large allocations come from `mmap`, and every new page faults on first touch (at
//! `T = 512, d = 576` this made the bf16 forward ~40% slower than f32; with reuse the gap is a
//! few percent). So buffers are taken from, and returned to, a small per-thread pool.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// At most this many buffers are kept per thread...
const MAX_BUFFERS: usize = 8;
/// ...and at most this many `f32` elements in all (1 GiB).
const MAX_ELEMS: usize = 1 << 28;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A scratch buffer of `len` `f32`s whose contents are unspecified (left over from an earlier
/// use, or zero): every user overwrites it completely before reading. Goes back to the pool on
/// drop.
pub(crate) struct Scratch {
    buf: Vec<f32>,
}

impl Scratch {
    /// A buffer of `len` elements with unspecified (but initialised) contents.
    pub(crate) fn stale(len: usize) -> Scratch {
        let taken = POOL
            .try_with(|p| {
                let mut p = p.borrow_mut();
                // Best fit among those large enough, else the largest (it grows).
                let fit = (0..p.len()).filter(|&i| p[i].capacity() >= len).min_by_key(|&i| p[i].capacity());
                let pick = fit.or_else(|| (0..p.len()).max_by_key(|&i| p[i].capacity()));
                pick.map(|i| p.swap_remove(i))
            })
            .ok()
            .flatten();
        let mut buf = taken.unwrap_or_default();
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0.0);
        }
        Scratch { buf }
    }
}

impl Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() == 0 || buf.capacity() > MAX_ELEMS {
            return;
        }
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            let total: usize = p.iter().map(|b| b.capacity()).sum();
            if p.len() < MAX_BUFFERS && total + buf.capacity() <= MAX_ELEMS {
                // `stale` sets the length when the buffer is taken again.
                p.push(buf);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_sizes() {
        let ptr = {
            let mut a = Scratch::stale(1000);
            a.iter_mut().for_each(|v| *v = 1.0);
            a.as_ptr()
        };
        let b = Scratch::stale(600);
        assert_eq!(b.len(), 600);
        assert_eq!(b.as_ptr(), ptr, "the pooled buffer is reused");
        let c = Scratch::stale(5000);
        assert_eq!(c.len(), 5000);
        assert!(c.iter().all(|v| v.is_finite()));
    }
}
