//! Device out-of-memory and absurd sizes on the CUDA backend come back as `Err`, never a panic
//! or an abort, and the device stays usable after them: an allocation of 4 TiB, one whose byte
//! count overflows, filling the whole device in 1 GiB pieces, layer shapes whose sizes
//! overflow or do not match their buffers; then a small forward pass checked against the
//! float64 reference.
//!
//! Without a CUDA device the test prints `skipped: no CUDA device` and passes; with
//! `WEGEFT_REQUIRE_GPU=1` it fails instead (the GPU check runs it so).
#![cfg(feature = "cuda")]

mod common;

use common::rand_vec;
use wegeft::cuda::{CudaBackend, Dropout, Launch};
use wegeft::reference as rf;
use wegeft::{Error, LayerShape};

fn gpu() -> Option<CudaBackend> {
    common::device_or_skip(CudaBackend::new(0))
}

/// A small f32 forward pass, checked against the reference: the device still works.
fn small_forward_works(dev: &CudaBackend, what: &str) {
    let s = LayerShape::new(3, 8, 5, 2).unwrap();
    let (x, w, phi, psi) = (rand_vec(1, 24), rand_vec(2, 40), rand_vec(3, 16), rand_vec(4, 16));
    let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
    let st = dev.stream();
    let (xd, wd, phid, psid) = (
        st.clone_htod(&f(&x)).unwrap(),
        st.clone_htod(&f(&w)).unwrap(),
        st.clone_htod(&f(&phi)).unwrap(),
        st.clone_htod(&f(&psi)).unwrap(),
    );
    let (mut u, mut c, mut y) = (
        dev.alloc_zeros::<f32>(6).unwrap(),
        dev.alloc_zeros::<f32>(10).unwrap(),
        dev.alloc_zeros::<f32>(15).unwrap(),
    );
    dev.wegeft_forward(
        &s,
        &xd,
        &wd,
        None,
        &phid,
        &psid,
        1.0,
        Dropout::NONE,
        &mut u,
        &mut c,
        &mut y,
        Launch::new(),
    )
    .unwrap_or_else(|e| panic!("{what}: forward failed: {e}"));
    let got = st.clone_dtoh(&y).unwrap();
    let want = rf::wegeft_forward(&s, &x, &w, None, &phi, &psi, 1.0).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}: y {g} vs {w}");
    }
}

#[test]
fn out_of_memory_is_an_error_and_the_device_survives() {
    let Some(dev) = gpu() else { return };
    small_forward_works(&dev, "before");
    // 4 TiB: more than any device has.
    match dev.alloc_zeros::<f32>(1 << 40) {
        Err(Error::Cuda { msg, .. }) => assert!(msg.contains("4398046511104 bytes"), "{msg}"),
        other => panic!("a 4 TiB allocation gave {:?}", other.map(|_| ())),
    }
    // Bytes that overflow usize.
    assert!(matches!(
        dev.alloc_zeros::<f32>(usize::MAX / 2),
        Err(Error::Cuda { .. })
    ));
    small_forward_works(&dev, "after a refused allocation");
    // Fill the device in 1 GiB pieces until it refuses (at most 512 pieces).
    let mut held = Vec::new();
    let err = loop {
        match dev.alloc_zeros::<u8>(1 << 30) {
            Ok(b) => held.push(b),
            Err(e) => break Some(e),
        }
        if held.len() == 512 {
            break None;
        }
    };
    let n = held.len();
    let err = err.unwrap_or_else(|| panic!("512 GiB allocated without an error"));
    assert!(matches!(err, Error::Cuda { .. }), "{err}");
    assert!(n >= 1, "not even 1 GiB could be allocated: {err}");
    println!("device full after {n} GiB: {err}");
    drop(held);
    dev.synchronize().unwrap();
    small_forward_works(&dev, "after filling the device");
}

#[test]
fn absurd_layer_shapes_are_errors() {
    // Shapes whose element counts overflow are refused on the host, device or not.
    assert!(LayerShape::new(usize::MAX / 2, 4, 4, 2).is_err());
    assert!(LayerShape::new(4, usize::MAX / 2, 4, 2).is_err());
    assert!(LayerShape::new(4, 4, 4, usize::MAX / 2).is_err());
    let Some(dev) = gpu() else { return };
    // A huge shape (2^20 tokens x 2^16) with small buffers: refused before any launch.
    let s = LayerShape::new(1 << 20, 1 << 16, 1 << 16, 64).unwrap();
    let b = |n| dev.alloc_zeros::<f32>(n).unwrap();
    let (x, w, phi, psi) = (b(16), b(16), b(16), b(16));
    let (mut u, mut c, mut y) = (b(16), b(16), b(16));
    let r = dev.wegeft_forward(
        &s,
        &x,
        &w,
        None,
        &phi,
        &psi,
        1.0,
        Dropout::NONE,
        &mut u,
        &mut c,
        &mut y,
        Launch::new(),
    );
    assert!(r.is_err());
    small_forward_works(&dev, "after a refused shape");
}
