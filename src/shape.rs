//! Shapes, matrix views and the checks every entry point runs before doing any work.
//!
//! All matrices are row-major. A view has `rows x cols` elements; row `i` starts at `i * ld`
//! (`ld >= cols`, the row stride or "leading dimension"); columns are contiguous.

use crate::error::{Error, Result};

/// The shape of one WeGeFT layer call.
///
/// | name | shape |
/// |---|---|
/// | `x` (input tokens) | `tokens x d_in` |
/// | `W` (frozen weight) | `d_out x d_in` |
/// | `b` (bias, optional) | `d_out` |
/// | `phi` | `d_in x rank` |
/// | `psi` | `rank x d_in` |
/// | `y`, `G = dL/dy` | `tokens x d_out` |
/// | `C = s W phi` | `d_out x rank` |
/// | `u = x psi^T`, `v = G C` | `tokens x rank` |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerShape {
    pub tokens: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
}

impl LayerShape {
    /// A checked shape: every dimension positive and every matrix size representable.
    pub fn new(tokens: usize, d_in: usize, d_out: usize, rank: usize) -> Result<Self> {
        for (what, v) in [("tokens", tokens), ("d_in", d_in), ("d_out", d_out), ("rank", rank)] {
            if v == 0 {
                return Err(Error::ZeroDim { what });
            }
        }
        let s = LayerShape { tokens, d_in, d_out, rank };
        for (what, r, c) in [
            ("x", tokens, d_in),
            ("W", d_out, d_in),
            ("y", tokens, d_out),
            ("phi", d_in, rank),
            ("u", tokens, rank),
            ("C", d_out, rank),
        ] {
            checked_len(what, r, c)?;
        }
        // The K-extended GEMMs run over d_in + rank and d_out + rank.
        d_in.checked_add(rank).ok_or(Error::Overflow { what: "d_in + rank", rows: d_in, cols: rank })?;
        d_out.checked_add(rank).ok_or(Error::Overflow { what: "d_out + rank", rows: d_out, cols: rank })?;
        Ok(s)
    }
    pub fn x(&self) -> (usize, usize) {
        (self.tokens, self.d_in)
    }
    pub fn w(&self) -> (usize, usize) {
        (self.d_out, self.d_in)
    }
    pub fn y(&self) -> (usize, usize) {
        (self.tokens, self.d_out)
    }
    pub fn phi(&self) -> (usize, usize) {
        (self.d_in, self.rank)
    }
    pub fn psi(&self) -> (usize, usize) {
        (self.rank, self.d_in)
    }
    pub fn c(&self) -> (usize, usize) {
        (self.d_out, self.rank)
    }
    pub fn u(&self) -> (usize, usize) {
        (self.tokens, self.rank)
    }
    /// LoRA's `A` (`rank x d_in`).
    pub fn lora_a(&self) -> (usize, usize) {
        (self.rank, self.d_in)
    }
    /// LoRA's `B` (`d_out x rank`).
    pub fn lora_b(&self) -> (usize, usize) {
        (self.d_out, self.rank)
    }
}

/// `rows * cols` without overflow.
pub fn checked_len(what: &'static str, rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols).ok_or(Error::Overflow { what, rows, cols })
}

/// Elements a `rows x cols` view with row stride `ld` spans.
fn span(arg: &'static str, rows: usize, cols: usize, ld: usize) -> Result<usize> {
    if ld < cols {
        return Err(Error::Stride { arg, ld, cols });
    }
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    (rows - 1)
        .checked_mul(ld)
        .and_then(|v| v.checked_add(cols))
        .ok_or(Error::Overflow { what: arg, rows, cols: ld })
}

/// A read-only row-major matrix view.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    ld: usize,
    name: &'static str,
}

/// A mutable row-major matrix view.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    ld: usize,
    name: &'static str,
}

impl<'a, T> Mat<'a, T> {
    /// A contiguous `rows x cols` view of `data`, which must hold exactly `rows * cols` elements.
    pub fn new(name: &'static str, data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        let needed = checked_len(name, rows, cols)?;
        if data.len() != needed {
            return Err(Error::Layout { arg: name, rows, cols, ld: cols, needed, len: data.len() });
        }
        Ok(Mat { data, rows, cols, ld: cols, name })
    }
    /// A strided view: row `i` starts at `data[i * ld]`.
    pub fn strided(name: &'static str, data: &'a [T], rows: usize, cols: usize, ld: usize) -> Result<Self> {
        let needed = span(name, rows, cols, ld)?;
        if data.len() < needed {
            return Err(Error::Layout { arg: name, rows, cols, ld, needed, len: data.len() });
        }
        Ok(Mat { data, rows, cols, ld, name })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn ld(&self) -> usize {
        self.ld
    }
    pub fn name(&self) -> &'static str {
        self.name
    }
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    pub fn data(&self) -> &'a [T] {
        self.data
    }
    pub fn is_contiguous(&self) -> bool {
        self.ld == self.cols || self.rows <= 1
    }
    /// Row `i` (`cols` elements).
    #[inline]
    pub fn row(&self, i: usize) -> &'a [T] {
        &self.data[i * self.ld..i * self.ld + self.cols]
    }
    /// Returns `Err(Shape)` unless this view is `expected`.
    pub fn expect(self, expected: (usize, usize)) -> Result<Self> {
        if self.shape() != expected {
            return Err(Error::Shape { arg: self.name, expected, got: self.shape() });
        }
        Ok(self)
    }
}

impl<'a, T: Copy> Mat<'a, T> {
    #[inline]
    pub fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.ld + j]
    }
}

impl<'a, T> MatMut<'a, T> {
    /// A contiguous mutable `rows x cols` view of `data` (exactly `rows * cols` elements).
    pub fn new(name: &'static str, data: &'a mut [T], rows: usize, cols: usize) -> Result<Self> {
        let needed = checked_len(name, rows, cols)?;
        if data.len() != needed {
            return Err(Error::Layout { arg: name, rows, cols, ld: cols, needed, len: data.len() });
        }
        Ok(MatMut { data, rows, cols, ld: cols, name })
    }
    /// A strided mutable view: row `i` starts at `data[i * ld]`.
    pub fn strided(name: &'static str, data: &'a mut [T], rows: usize, cols: usize, ld: usize) -> Result<Self> {
        let needed = span(name, rows, cols, ld)?;
        if data.len() < needed {
            return Err(Error::Layout { arg: name, rows, cols, ld, needed, len: data.len() });
        }
        Ok(MatMut { data, rows, cols, ld, name })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn ld(&self) -> usize {
        self.ld
    }
    pub fn name(&self) -> &'static str {
        self.name
    }
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    pub fn is_contiguous(&self) -> bool {
        self.ld == self.cols || self.rows <= 1
    }
    pub fn data_mut(&mut self) -> &mut [T] {
        self.data
    }
    pub fn as_ref(&self) -> Mat<'_, T> {
        Mat { data: self.data, rows: self.rows, cols: self.cols, ld: self.ld, name: self.name }
    }
    #[inline]
    pub fn row_mut(&mut self, i: usize) -> &mut [T] {
        &mut self.data[i * self.ld..i * self.ld + self.cols]
    }
    /// Returns `Err(Shape)` unless this view is `expected`.
    pub fn expect(self, expected: (usize, usize)) -> Result<Self> {
        if self.shape() != expected {
            return Err(Error::Shape { arg: self.name, expected, got: self.shape() });
        }
        Ok(self)
    }
}

/// Checks a bias vector's length.
pub fn check_len<T>(arg: &'static str, v: &[T], expected: usize) -> Result<()> {
    if v.len() != expected {
        return Err(Error::Len { arg, expected, got: v.len() });
    }
    Ok(())
}
