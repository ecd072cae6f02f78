//! A GGUF reader (memory-mapped), f32 dequantization, and a small writer.
//!
//! # Format (versions 2 and 3, little-endian)
//!
//! ```text
//! magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
//! n_kv x   { key: string, type: u32, value }
//! n_tensors x { name: string, n_dims u32 (<= 4), ne[n_dims] u64, ggml_type u32, offset u64 }
//! padding to `general.alignment` (default 32)
//! tensor data: tensor i at data_start + offset_i (offset_i a multiple of the alignment)
//! string = len u64 + UTF-8 bytes; array = elem_type u32 + count u64 + elements
//! ```
//!
//! `ne[0]` is the fastest-varying dimension: a GGUF tensor with `ne = [cols, rows]` is the
//! row-major `rows x cols` matrix of PyTorch, so [`TensorInfo::shape`] reverses `ne`.
//!
//! # Dequantization (block of 32 values `x[0..32]`, `d`/`m` stored as f16)
//!
//! * `Q8_0` (34 bytes): `d, q[32] (i8)`; `x[j] = d * q[j]`.
//! * `Q4_0` (18 bytes): `d, qs[16]`; `x[j] = d * ((qs[j] & 15) - 8)`,
//!   `x[j+16] = d * ((qs[j] >> 4) - 8)`, `j < 16`.
//! * `Q4_1` (20 bytes): `d, m, qs[16]`; `x[j] = d * (qs[j] & 15) + m`,
//!   `x[j+16] = d * (qs[j] >> 4) + m`.
//! * `Q5_0` (22 bytes): `d, qh (u32), qs[16]`; the 5th bit of `x[j]` is bit `j` of `qh`, of
//!   `x[j+16]` bit `j+16`; `x = d * (q5 - 16)`.
//! * `Q5_1` (24 bytes): `d, m, qh, qs[16]`; `x = d * q5 + m`.
//! * `F32`, `F16`, `BF16`, `F64` are converted element by element.
//!
//! K-quants (super-blocks of 256 values; the types of the common `Q4_K_M`, `Q5_K_M`, `Q6_K`,
//! `Q3_K_*` and `Q2_K` files):
//!
//! * `Q2_K` (84 bytes): `scales[16], qs[64], d, dmin`; 16 groups of 16, group `g` with
//!   `s = scales[g]`: `x = d (s & 15) q - dmin (s >> 4)`, `q` 2 bits: value `i` of half `h`
//!   (128 each) and quarter `j` is bits `2j..2j+2` of `qs[32 h + i % 32]`.
//! * `Q3_K` (110 bytes): `hmask[32], qs[64], scales[12], d`; as `Q2_K` for the low 2 bits, a
//!   3rd bit from `hmask` (bit `4 h + j` of `hmask[i % 32]`; clear means `- 4`), 16 signed
//!   6-bit scales (low nibbles in bytes 0..8, top 2 bits in bytes 8..12; minus 32): `x = d s q`.
//! * `Q4_K` (144 bytes): `d, dmin, scales[12], qs[128]`; 8 groups of 32 with 6-bit scale `s`
//!   and min `m` (`k4_scale_min`): `x = d s q - dmin m`, `q` the low nibbles of 32 bytes
//!   for the even group, the high ones for the odd group.
//! * `Q5_K` (176 bytes): `d, dmin, scales[12], qh[32], qs[128]`; as `Q4_K` with a 5th bit,
//!   bit `g` of `qh[i % 32]` for group `g`.
//! * `Q6_K` (210 bytes): `ql[128], qh[64], scales[16] (i8), d`; `x = d s (q - 32)` with
//!   6-bit `q` from a nibble of `ql` and 2 bits of `qh`, 16 groups of 16.
//!
//! Non-linear 4-bit (the types of `IQ4_NL` and `IQ4_XS` files), on ggml's 16 levels
//! `L = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]`:
//!
//! * `IQ4_NL` (18 bytes): `d, qs[16]`; `x[j] = d L[qs[j] & 15]`, `x[j+16] = d L[qs[j] >> 4]`.
//! * `IQ4_XS` (136 bytes): `d, scales_h (u16), scales_l[4], qs[128]`; 8 groups of 32 as
//!   `IQ4_NL`, group `g` with scale `d (s - 32)`, `s` 6 bits: the nibble `g % 2` of
//!   `scales_l[g / 2]` and bits `2g..2g+2` of `scales_h` above it.
//!
//! Each matches gguf-py (llama.cpp's Python package) to the bit on random blocks
//! (`tests/data/quants`, `scripts/quant_vectors.py`). Other ggml types (the other IQ-quants,
//! `Q8_K`, ternary and integer types) are recognised by name and rejected with
//! [`Error::Format`] naming the tensor.
//!
//! # Why a reader of our own
//!
//! Candidates were `candle-core`'s `quantized::gguf_file` (pulls in all of candle for a
//! 400-line job) and `ggus` 0.5 (edition 2024, so it would raise the crate's MSRV above 1.80;
//! its typed metadata accessors `unwrap()`/`panic!` on unexpected types, which breaks the rule
//! that hostile files give an `Err`; dequantization lives in a separate crate). The format is
//! small and stable, so this module reads it directly, bounds-checking every offset and length
//! against the file size (array and tensor counts are capped by the bytes left in the file, the
//! nesting of arrays by [`MAX_ARRAY_DEPTH`]), and returns `Error::Format { path, msg }` naming
//! the file and the key or tensor on every failure. It never panics on any input.
//!
//! The file is memory-mapped read-only (`memmap2`). As with every mmap reader, the file must
//! not be truncated or modified by another process while it is open.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// The 4 magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The deepest nesting of arrays inside arrays this reader accepts.
pub const MAX_ARRAY_DEPTH: usize = 4;
/// The most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;

// -------------------------------------------------------------------------------------------
// ggml tensor types
// -------------------------------------------------------------------------------------------

/// A ggml tensor type (`ggml_type`), as stored in the tensor infos.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl GgmlType {
    /// The type for a `ggml_type` id, `None` for ids this reader does not know.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    /// The `ggml_type` id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
        }
    }

    /// `(values per block, bytes per block)`, as in ggml's type traits.
    pub fn block(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            BF16 => (1, 2),
            F64 => (1, 8),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            IQ2_XXS => (256, 66),
            IQ2_XS => (256, 74),
            IQ3_XXS => (256, 98),
            IQ1_S => (256, 50),
            IQ4_NL => (32, 18),
            IQ3_S => (256, 110),
            IQ2_S => (256, 82),
            IQ4_XS => (256, 136),
            IQ1_M => (256, 56),
            TQ1_0 => (256, 54),
            TQ2_0 => (256, 66),
            MXFP4 => (32, 17),
        }
    }

    /// Whether [`dequantize`] converts this type to f32.
    pub fn is_supported(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | BF16 | F64 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_NL | IQ4_XS
        )
    }

    /// The ggml name of the type (`"Q4_1"`).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
        }
    }

    /// Bytes taken by `n` values of this type; `None` when `n` is not a whole number of
    /// blocks or the size overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let (bs, ts) = self.block();
        if n % bs as u64 != 0 {
            return None;
        }
        (n / bs as u64).checked_mul(ts as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// -------------------------------------------------------------------------------------------
// Metadata values
// -------------------------------------------------------------------------------------------

/// The type tag of a metadata value (`gguf_metadata_value_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    /// The type for a tag, `None` for unknown tags.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The fewest bytes a value of this type takes in a file (used to cap array counts).
    fn min_size(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// An array: the element type and the elements (all of that type).
    Array(GgufValueType, Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The type tag of this value.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(..) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// The value as a non-negative integer, whatever its integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, whatever its integer type.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().map(|v| v as i64),
        }
    }

    /// The value as a float (float or integer types).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements of an array value.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(_, v) => Some(v),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self.value_type() {
            GgufValueType::U8 => "u8",
            GgufValueType::I8 => "i8",
            GgufValueType::U16 => "u16",
            GgufValueType::I16 => "i16",
            GgufValueType::U32 => "u32",
            GgufValueType::I32 => "i32",
            GgufValueType::F32 => "f32",
            GgufValueType::Bool => "bool",
            GgufValueType::String => "string",
            GgufValueType::Array => "array",
            GgufValueType::U64 => "u64",
            GgufValueType::I64 => "i64",
            GgufValueType::F64 => "f64",
        }
    }
}

// -------------------------------------------------------------------------------------------
// Tensor infos
// -------------------------------------------------------------------------------------------

/// Where one tensor lives in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml dimensions, `ne[0]` fastest-varying.
    pub ne: Vec<u64>,
    /// The storage type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Row-major (PyTorch) shape: `ne` reversed. A GGUF `[cols, rows]` is `[rows, cols]`.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.ne.iter().product::<u64>() as usize
    }
}

// -------------------------------------------------------------------------------------------
// The reader
// -------------------------------------------------------------------------------------------

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An open GGUF file: parsed header, metadata and tensor infos over the mapped bytes.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(self.path, msg.into())
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: {} needs {} bytes at offset {}, the file has {} bytes",
                what(),
                n,
                self.pos,
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(format!("{} is not valid UTF-8", what())))
    }

    fn value(&mut self, ty: GgufValueType, depth: usize, what: &dyn Fn() -> String) -> Result<GgufValue> {
        use GgufValueType as T;
        Ok(match ty {
            T::U8 => GgufValue::U8(self.array::<1>(what)?[0]),
            T::I8 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            T::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            T::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            T::U32 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            T::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            T::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            T::U64 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            T::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            T::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            T::Bool => {
                let b = self.array::<1>(what)?[0];
                match b {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    _ => return Err(self.err(format!("{}: bool byte {b} is neither 0 nor 1", what()))),
                }
            }
            T::String => GgufValue::String(self.string(what)?),
            T::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!("{}: arrays nested deeper than {MAX_ARRAY_DEPTH}", what())));
                }
                let et = self.u32(&|| format!("element type of {}", what()))?;
                let et = GgufValueType::from_id(et)
                    .ok_or_else(|| self.err(format!("{}: unknown array element type {et}", what())))?;
                let n = self.u64(&|| format!("element count of {}", what()))?;
                let cap = self.remaining() / et.min_size();
                if n > cap {
                    return Err(self.err(format!(
                        "{}: array of {n} {:?} elements cannot fit in the {} bytes left in the file",
                        what(),
                        et,
                        self.remaining()
                    )));
                }
                let mut v = Vec::with_capacity((n as usize).min(1 << 16));
                for i in 0..n {
                    v.push(self.value(et, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                GgufValue::Array(et, v)
            }
        })
    }
}

impl GgufFile {
    /// Opens and parses `path` (memory-mapped). Only the header, metadata and tensor infos
    /// are read here; tensor data is read on demand by [`GgufFile::tensor_f32`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 24 {
            return Err(Error::format(
                path,
                format!("truncated: {len} bytes is too short for a GGUF header (24 bytes)"),
            ));
        }
        // SAFETY: the map is read-only; the documented contract is that the file is not
        // modified while it is open (as for every mmap-based model loader).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), Storage::Mmap(mmap))
    }

    /// Parses GGUF bytes held in memory; `name` stands for the path in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(name.into(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<Self> {
        let buf = storage.bytes();
        let mut c = Cursor { buf, pos: 0, path: &path };
        let magic: [u8; 4] = c.array(&|| "magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(c.err(format!("bad magic {magic:02x?}, expected \"GGUF\" (not a GGUF file)")));
        }
        let version = c.u32(&|| "version".into())?;
        match version {
            2 | 3 => {}
            1 => return Err(c.err("GGUF version 1 is not supported (only 2 and 3)")),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(c.err("big-endian GGUF files are not supported"))
            }
            v => return Err(c.err(format!("unknown GGUF version {v} (only 2 and 3)"))),
        }
        let n_tensors = c.u64(&|| "tensor count".into())?;
        let n_kv = c.u64(&|| "metadata count".into())?;
        // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info
        // at least 8 + 4 + 4 + 8.
        if n_kv > c.remaining() / 13 {
            return Err(c.err(format!("metadata count {n_kv} cannot fit in a {}-byte file", buf.len())));
        }
        if n_tensors > c.remaining() / 24 {
            return Err(c.err(format!("tensor count {n_tensors} cannot fit in a {}-byte file", buf.len())));
        }

        let mut metadata = Vec::with_capacity((n_kv as usize).min(1 << 12));
        let mut meta_index = HashMap::with_capacity((n_kv as usize).min(1 << 12));
        for i in 0..n_kv {
            let key = c.string(&|| format!("key of metadata entry {i}"))?;
            let ty = c.u32(&|| format!("type of metadata {key:?}"))?;
            let ty = GgufValueType::from_id(ty)
                .ok_or_else(|| c.err(format!("metadata {key:?}: unknown value type {ty}")))?;
            let v = c.value(ty, 0, &|| format!("metadata {key:?}"))?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.err(format!("duplicate metadata key {key:?}")));
            }
            metadata.push((key, v));
        }

        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let a = metadata[i].1.as_u64().filter(|&a| a > 0 && a.is_power_of_two() && a <= 1 << 20);
                a.ok_or_else(|| {
                    c.err(format!(
                        "general.alignment = {:?} is not a power of two in 1..=2^20",
                        metadata[i].1
                    ))
                })?
            }
        };

        let mut tensors = Vec::with_capacity((n_tensors as usize).min(1 << 12));
        let mut tensor_index = HashMap::with_capacity((n_tensors as usize).min(1 << 12));
        for i in 0..n_tensors {
            let name = c.string(&|| format!("name of tensor {i}"))?;
            let n_dims = c.u32(&|| format!("tensor {name:?}: dimension count"))?;
            if n_dims == 0 || n_dims as usize > MAX_DIMS {
                return Err(c.err(format!("tensor {name:?}: {n_dims} dimensions (expected 1..={MAX_DIMS})")));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                ne.push(c.u64(&|| format!("tensor {name:?}: dimension {d}"))?);
            }
            let ty_id = c.u32(&|| format!("tensor {name:?}: type"))?;
            let ty = GgmlType::from_id(ty_id)
                .ok_or_else(|| c.err(format!("tensor {name:?}: unknown ggml type id {ty_id}")))?;
            let offset = c.u64(&|| format!("tensor {name:?}: data offset"))?;
            let n_elem = ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let n_elem =
                n_elem.ok_or_else(|| c.err(format!("tensor {name:?}: dimensions {ne:?} overflow")))?;
            let (bs, _) = ty.block();
            if ne[0] % bs as u64 != 0 {
                return Err(c.err(format!(
                    "tensor {name:?}: first dimension {} is not a multiple of the {ty} block size {bs}",
                    ne[0]
                )));
            }
            let n_bytes = ty
                .bytes_for(n_elem)
                .ok_or_else(|| c.err(format!("tensor {name:?}: size of {ne:?} {ty} overflows")))?;
            if offset % alignment != 0 {
                return Err(c.err(format!(
                    "tensor {name:?}: data offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(c.err(format!("duplicate tensor name {name:?}")));
            }
            tensors.push(TensorInfo { name, ne, ty, offset, n_bytes });
        }

        let end_of_infos = c.pos as u64;
        let data_start = end_of_infos.div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;
        for t in &tensors {
            let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(c.err(format!(
                        "tensor {:?}: data [{} + {}, +{} bytes) runs past the end of the {}-byte file",
                        t.name, data_start, t.offset, t.n_bytes, file_len
                    )))
                }
            }
        }
        Ok(GgufFile {
            path,
            storage,
            version,
            alignment,
            data_start,
            metadata,
            meta_index,
            tensors,
            tensor_index,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Alignment of the data section (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Absolute file offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }
    /// All metadata key-value pairs in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }
    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Builds an [`Error::Format`] naming this file.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        Error::format(&self.path, msg)
    }

    /// The value of metadata `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| self.error(format!("missing metadata key {key:?}")))
    }

    fn wrong_type(&self, key: &str, want: &str, v: &GgufValue) -> Error {
        self.error(format!("metadata {key:?}: expected {want}, got {}", v.type_name()))
    }

    /// Metadata `key` as a non-negative integer that fits `usize`.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.require(key)?;
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// Metadata `key` as a float (a float or an integer value).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    /// Metadata `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    /// Metadata `key` as a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v))
    }

    /// Metadata `key` as an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.require(key)?;
        let a = v.as_array().ok_or_else(|| self.wrong_type(key, "an array of strings", v))?;
        a.iter()
            .enumerate()
            .map(|(i, e)| {
                e.as_str().ok_or_else(|| self.error(format!("metadata {key:?}[{i}]: expected a string")))
            })
            .collect()
    }

    /// Metadata `key` as an array of integers.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        let v = self.require(key)?;
        let a = v.as_array().ok_or_else(|| self.wrong_type(key, "an array of integers", v))?;
        a.iter()
            .enumerate()
            .map(|(i, e)| {
                e.as_i64().ok_or_else(|| self.error(format!("metadata {key:?}[{i}]: expected an integer")))
            })
            .collect()
    }

    /// Metadata `key` as an array of numbers (floats or integers).
    pub fn get_f64_array(&self, key: &str) -> Result<Vec<f64>> {
        let v = self.require(key)?;
        let a = v.as_array().ok_or_else(|| self.wrong_type(key, "an array of numbers", v))?;
        a.iter()
            .enumerate()
            .map(|(i, e)| e.as_f64().ok_or_else(|| self.error(format!("metadata {key:?}[{i}]: expected a number"))))
            .collect()
    }

    /// The info of tensor `name`, or an error naming the file and the tensor.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| self.error(format!("missing tensor {name:?}")))
    }

    /// Whether the file has a tensor called `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensor_index.contains_key(name)
    }

    /// The raw stored bytes of tensor `name` (bounds were checked when the file was opened).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor_info(name)?;
        let start = (self.data_start + t.offset) as usize;
        self.storage
            .bytes()
            .get(start..start + t.n_bytes as usize)
            .ok_or_else(|| self.error(format!("tensor {name:?}: data out of bounds")))
    }

    /// Tensor `name` dequantized to f32, with its row-major shape (`ne` reversed).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.tensor_info(name)?;
        let bytes = self.tensor_bytes(name)?;
        let n = t.n_elements();
        let mut out = Vec::new();
        out.try_reserve_exact(n)
            .map_err(|_| self.error(format!("tensor {name:?}: cannot allocate {n} f32 values")))?;
        out.resize(n, 0.0f32);
        dequantize_msg(t.ty, bytes, &mut out).map_err(|m| self.error(format!("tensor {name:?}: {m}")))?;
        Ok((t.shape(), out))
    }
}

// -------------------------------------------------------------------------------------------
// Dequantization
// -------------------------------------------------------------------------------------------

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn deq_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * ((qs[j] & 15) as i32 - 8) as f32;
        y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

fn deq_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * (qs[j] & 15) as f32 + m;
        y[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

fn deq_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (((qs[j] & 15) as u32 | h0) as i32 - 16) as f32;
        y[j + 16] = d * (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32;
    }
}

fn deq_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = d * ((qs[j] & 15) as u32 | h0) as f32 + m;
        y[j + 16] = d * ((qs[j] >> 4) as u32 | h1) as f32 + m;
    }
}

fn deq_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = d * (b[2 + j] as i8) as f32;
    }
}

// ---- K-quants: super-blocks of 256 values in 16 or 8 sub-blocks (module docs) ----------------

/// Scale and min of sub-block `j` (0..8) of a Q4_K / Q5_K block, 6 bits each, packed in 12
/// bytes: `j < 4`: the low 6 bits of bytes `j` and `j + 4`; else the nibbles of byte `j + 4`
/// with the top 2 bits of bytes `j - 4` and `j` above them.
fn k4_scale_min(sc: &[u8], j: usize) -> (f32, f32) {
    if j < 4 {
        ((sc[j] & 63) as f32, (sc[j + 4] & 63) as f32)
    } else {
        let d = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
        let m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
        (d as f32, m as f32)
    }
}

fn deq_q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for j in 0..4 {
            for k in 0..2 {
                let sc = scales[8 * half + 2 * j + k];
                let (dl, ml) = (d * (sc & 15) as f32, dmin * (sc >> 4) as f32);
                let out = &mut y[128 * half + 32 * j + 16 * k..][..16];
                for (l, o) in out.iter_mut().enumerate() {
                    *o = dl * ((q[16 * k + l] >> (2 * j)) & 3) as f32 - ml;
                }
            }
        }
    }
}

fn deq_q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    // 16 scales of 6 bits: the low nibble from bytes 0..8 (low then high nibbles), the top
    // two bits from bytes 8..12 (2 bits per scale, in groups of four).
    let scale = |i: usize| -> f32 {
        let lo = (sc[i % 8] >> (4 * (i / 8))) & 15;
        let hi = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        ((lo | (hi << 4)) as i32 - 32) as f32
    };
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for j in 0..4 {
            let bit = 4 * half + j; // the hmask bit of this group of 32
            for k in 0..2 {
                let dl = d * scale(8 * half + 2 * j + k);
                let out = &mut y[128 * half + 32 * j + 16 * k..][..16];
                for (l, o) in out.iter_mut().enumerate() {
                    let i = 16 * k + l;
                    let low = ((q[i] >> (2 * j)) & 3) as i32;
                    let high = if (hmask[i] >> bit) & 1 == 1 { 0 } else { 4 };
                    *o = dl * (low - high) as f32;
                }
            }
        }
    }
}

/// Q4_K and Q5_K: 8 groups of 32, `x = d s q - dmin m` with the 6-bit scale and min of the
/// group; `q` is a nibble of `qs` and, for Q5_K (`qh` given), bit `g` of `qh[l]` above it.
fn deq_k4_k5(d: f32, dmin: f32, sc: &[u8], qs: &[u8], qh: Option<&[u8]>, y: &mut [f32]) {
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        let (s1, m1) = k4_scale_min(sc, 2 * c);
        let (s2, m2) = k4_scale_min(sc, 2 * c + 1);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        for l in 0..32 {
            let (h1, h2) = match qh {
                Some(qh) => (((qh[l] >> (2 * c)) & 1) << 4, ((qh[l] >> (2 * c + 1)) & 1) << 4),
                None => (0, 0),
            };
            y[64 * c + l] = d1 * ((q[l] & 15) | h1) as f32 - m1;
            y[64 * c + 32 + l] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
        }
    }
}

fn deq_q4_k(b: &[u8], y: &mut [f32]) {
    deq_k4_k5(f16_at(b, 0), f16_at(b, 2), &b[4..16], &b[16..144], None, y);
}

fn deq_q5_k(b: &[u8], y: &mut [f32]) {
    deq_k4_k5(f16_at(b, 0), f16_at(b, 2), &b[4..16], &b[48..176], Some(&b[16..48]), y);
}

fn deq_q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = |lo: u8, shift: u32| ((lo | (((qh[l] >> shift) & 3) << 4)) as i32 - 32) as f32;
            out[l] = d * (sc[is] as i8) as f32 * q(ql[l] & 15, 0);
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q(ql[l + 32] & 15, 2);
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q(ql[l] >> 4, 4);
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q(ql[l + 32] >> 4, 6);
        }
    }
}

// ---- IQ4: a non-linear 4-bit codebook (module docs) ---------------------------------------

/// The 16 levels of `IQ4_NL` and `IQ4_XS` (ggml's `kvalues_iq4nl`).
const IQ4_LEVELS: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// 32 values from the 16 bytes `qs` with scale `d`: the low nibbles first, then the high ones.
fn iq4_32(d: f32, qs: &[u8], y: &mut [f32]) {
    for j in 0..16 {
        y[j] = d * IQ4_LEVELS[(qs[j] & 15) as usize] as f32;
        y[j + 16] = d * IQ4_LEVELS[(qs[j] >> 4) as usize] as f32;
    }
}

fn deq_iq4_nl(b: &[u8], y: &mut [f32]) {
    iq4_32(f16_at(b, 0), &b[2..18], y);
}

fn deq_iq4_xs(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let (scales_l, qs) = (&b[4..8], &b[8..136]);
    for ib in 0..8 {
        let lo = (scales_l[ib / 2] >> (4 * (ib % 2))) & 15;
        let hi = ((scales_h >> (2 * ib)) & 3) as u8;
        let dl = d * ((lo | (hi << 4)) as i32 - 32) as f32;
        iq4_32(dl, &qs[16 * ib..16 * ib + 16], &mut y[32 * ib..32 * ib + 32]);
    }
}

/// Converts `data` (stored as `ty`) to f32 into `out`, in parallel over blocks (formulas in the
/// module docs). `out.len()` values are produced; `data` must hold exactly
/// `ty.bytes_for(out.len())` bytes. An unsupported type or a size mismatch is an
/// [`Error::Invalid`].
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    dequantize_msg(ty, data, out).map_err(|m| Error::invalid("data", m))
}

/// [`dequantize`] with the error as a bare message (the reader adds the file and tensor).
fn dequantize_msg(ty: GgmlType, data: &[u8], out: &mut [f32]) -> std::result::Result<(), String> {
    let (bs, ts) = ty.block();
    let need = ty
        .bytes_for(out.len() as u64)
        .ok_or_else(|| format!("{} values are not a whole number of {ty} blocks of {bs}", out.len()))?;
    if need != data.len() as u64 {
        return Err(format!("{} values of {ty} need {need} bytes, got {}", out.len(), data.len()));
    }
    // Blocks per rayon task: large enough to amortise scheduling.
    const CHUNK: usize = 1024;
    macro_rules! blocks {
        ($f:expr) => {
            out.par_chunks_mut(bs * CHUNK).zip(data.par_chunks(ts * CHUNK)).for_each(|(y, b)| {
                for (yb, bb) in y.chunks_exact_mut(bs).zip(b.chunks_exact(ts)) {
                    $f(bb, yb);
                }
            })
        };
    }
    match ty {
        GgmlType::F32 => blocks!(|b: &[u8], y: &mut [f32]| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => blocks!(|b: &[u8], y: &mut [f32]| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::BF16 => blocks!(|b: &[u8], y: &mut [f32]| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::F64 => blocks!(|b: &[u8], y: &mut [f32]| {
            y[0] = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
        }),
        GgmlType::Q4_0 => blocks!(deq_q4_0),
        GgmlType::Q4_1 => blocks!(deq_q4_1),
        GgmlType::Q5_0 => blocks!(deq_q5_0),
        GgmlType::Q5_1 => blocks!(deq_q5_1),
        GgmlType::Q8_0 => blocks!(deq_q8_0),
        GgmlType::Q2_K => blocks!(deq_q2_k),
        GgmlType::Q3_K => blocks!(deq_q3_k),
        GgmlType::Q4_K => blocks!(deq_q4_k),
        GgmlType::Q5_K => blocks!(deq_q5_k),
        GgmlType::Q6_K => blocks!(deq_q6_k),
        GgmlType::IQ4_NL => blocks!(deq_iq4_nl),
        GgmlType::IQ4_XS => blocks!(deq_iq4_xs),
        other => return Err(format!(
            "ggml type {other} is not supported (supported: F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)"
        )),
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------
// Writer
// -------------------------------------------------------------------------------------------

/// Builds a GGUF (version 3) file: metadata, then tensors given as already-encoded bytes.
/// Used by the tests to make small files by hand, and by tools that repack tensors.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file description.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry (`general.alignment` sets the data alignment).
    pub fn kv(&mut self, key: impl Into<String>, value: GgufValue) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Adds a tensor with ggml dimensions `ne` (`ne[0]` fastest) and its encoded bytes,
    /// which must be exactly `ty.bytes_for(prod(ne))` long.
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        ne: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<&mut Self> {
        let name = name.into();
        let n = ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let need = n.and_then(|n| ty.bytes_for(n));
        if ne.is_empty() || ne.len() > MAX_DIMS || need != Some(data.len() as u64) {
            return Err(Error::invalid(
                "data",
                format!("tensor {name:?}: {ty} with ne {ne:?} needs {need:?} bytes, got {}", data.len()),
            ));
        }
        self.tensors.push((name, ne.to_vec(), ty, data));
        Ok(self)
    }

    /// Adds an f32 tensor from row-major values of shape `shape` (ggml `ne` = shape reversed).
    pub fn tensor_f32(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        values: &[f32],
    ) -> Result<&mut Self> {
        let ne: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensor(name, &ne, GgmlType::F32, bytemuck::cast_slice(values).to_vec())
    }

    /// The encoded file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_to(&mut out).map_err(|e| Error::invalid("gguf", e.to_string()))?;
        Ok(out)
    }

    /// Writes the file atomically: a temporary file beside `path`, fsync, rename. The tensor
    /// data streams from this writer's buffers (no second copy of the file in memory).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        // Encoding errors (a bad alignment or array) before the file is created.
        self.header()?;
        super::write_atomic(path.as_ref(), |f| {
            let mut w = std::io::BufWriter::new(f);
            self.write_to(&mut w)?;
            w.flush()
        })
    }

    /// The data alignment (`general.alignment`, else 32).
    fn alignment(&self) -> Result<u64> {
        self.metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .map(|(_, v)| v.as_u64().filter(|a| *a > 0 && a.is_power_of_two()))
            .unwrap_or(Some(DEFAULT_ALIGNMENT))
            .ok_or_else(|| Error::invalid("general.alignment", "must be a power of two"))
    }

    /// Everything before the tensor data (padded to the alignment), and each tensor's offset
    /// in the data section.
    fn header(&self) -> Result<(Vec<u8>, Vec<u64>)> {
        let alignment = self.alignment()?;
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_str(&mut out, k);
            out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            write_value(&mut out, v)?;
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for (name, ne, ty, data) in &self.tensors {
            write_str(&mut out, name);
            out.extend_from_slice(&(ne.len() as u32).to_le_bytes());
            for d in ne {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(alignment) * alignment;
        }
        let n = (out.len() as u64).div_ceil(alignment) * alignment;
        out.resize(n as usize, 0);
        Ok((out, offsets))
    }

    /// The header, then each tensor's data at its offset, zero-padded to the alignment.
    fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        let invalid = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string());
        let alignment = self.alignment().map_err(invalid)?;
        let (header, _) = self.header().map_err(invalid)?;
        w.write_all(&header)?;
        let zeros = vec![0u8; alignment as usize];
        for (_, _, _, data) in &self.tensors {
            w.write_all(data)?;
            let pad = (data.len() as u64).div_ceil(alignment) * alignment - data.len() as u64;
            w.write_all(&zeros[..pad as usize])?;
        }
        Ok(())
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &GgufValue) -> Result<()> {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => write_str(out, s),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Array(et, items) => {
            out.extend_from_slice(&(*et as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for (i, it) in items.iter().enumerate() {
                if it.value_type() != *et {
                    return Err(Error::invalid(
                        "value",
                        format!("array element {i} is {:?}, the array holds {et:?}", it.value_type()),
                    ));
                }
                write_value(out, it)?;
            }
        }
    }
    Ok(())
}
