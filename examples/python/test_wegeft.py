"""The ctypes bindings (wegeft.py) on the layer fixtures and the error paths. Standard library only.

    python3 examples/python/test_wegeft.py [--lib libwegeft.so] FIXTURE.bin...

A fixture file is what tests/c_abi.rs writes for tests/c/test_wegeft.c: "WGFT", tokens, d_in,
d_out, rank (u64 LE), then f32 arrays x, W, b, phi, psi, G, y, dx, dphi, dpsi, W_merged
(float64 PyTorch autograd answers of ../shared/fixtures/layer/, scale 1). For each fixture:
forward (with and without bias, with the saved u / C), backward (saved and recomputed; dx
skipped), the multi-adapter forward with one adapter, merge and unmerge, in f32 and bf16
storage, against the fixture. Then the error
paths: a WegeftError naming the argument, never a crash. Prints "ok: ..." and exits 0 when all
pass.
"""

import argparse
import ctypes
import math
import os
import struct
import sys
from array import array

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wegeft  # noqa: E402

FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what)


def close_to(what, got, want, tol):
    """max |got - want| <= tol * max |want| (as test_wegeft.c)."""
    scale = max((abs(v) for v in want), default=0.0) or 1e-30
    worst, at = 0.0, 0
    for i, (g, w) in enumerate(zip(got, want)):
        d = abs(g - w) if math.isfinite(g) else math.inf
        if d > worst:
            worst, at = d, i
    check(len(got) == len(want) and worst <= tol * scale,
          f"{what}: worst |diff| {worst:.3g} at {at} (got {got[at]:.6g}, want {want[at]:.6g}), "
          f"allowed {tol * scale:.3g}")


def read_fixture(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"WGFT":
        raise ValueError(f"{path}: not a WGFT fixture")
    t, din, dout, r = struct.unpack_from("<4Q", data, 4)
    sizes = [("x", t * din), ("W", dout * din), ("b", dout), ("phi", din * r), ("psi", r * din), ("G", t * dout),
             ("y", t * dout), ("dx", t * din), ("dphi", din * r), ("dpsi", r * din), ("W_merged", dout * din)]
    fx, off = {"dims": (t, din, dout, r)}, 36
    for name, n in sizes:
        fx[name] = array("f", data[off:off + 4 * n])
        if len(fx[name]) != n:
            raise ValueError(f"{path}: {name} truncated")
        off += 4 * n
    return fx


def to_bf16(values):
    """f32 -> bf16 bits, round to nearest even (finite values)."""
    out = array("H")
    for v in values:
        b = struct.unpack("<I", struct.pack("<f", v))[0]
        out.append(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF)
    return out


def from_bf16(bits):
    return array("f", (struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in bits))


class Buf:
    """A host buffer of f32 (array 'f') or bf16 bits (array 'H'), addressable by ctypes."""

    def __init__(self, values, dtype):
        self.dtype = dtype
        self.a = array("f", values) if dtype == wegeft.F32 else to_bf16(values)

    @property
    def ptr(self):
        return self.a.buffer_info()[0]

    def c(self, ld=0):
        return wegeft.cmat(self.ptr, len(self.a), ld)

    def m(self, ld=0):
        return wegeft.mat(self.ptr, len(self.a), ld)

    def f32(self):
        return array("f", self.a) if self.dtype == wegeft.F32 else from_bf16(self.a)


def run_fixture(lib, name, fx, dtype):
    t, din, dout, r = fx["dims"]
    shape = wegeft.Shape(t, din, dout, r)
    tol = 1e-4 if dtype == wegeft.F32 else 3e-2
    tag = f"{name} {'f32' if dtype == wegeft.F32 else 'bf16'}"
    x, w, b, phi, psi, g = (Buf(fx[k], dtype) for k in ("x", "W", "b", "phi", "psi", "G"))
    # The reference of a rounded-input run is the fixture's; bf16 inputs move it by ~1e-2.
    y = Buf([math.nan] * (t * dout), dtype)
    u, c = array("f", [math.nan] * (t * r)), array("f", [math.nan] * (dout * r))
    lib.cpu_forward(dtype, shape, x.c(), w.c(), phi.c(), psi.c(), 1.0, y.m(), bias=b.ptr, bias_len=dout,
                    saved_u=u.buffer_info()[0], saved_u_len=len(u), saved_c=c.buffer_info()[0], saved_c_len=len(c))
    close_to(f"{tag} forward y", y.f32(), fx["y"], tol)
    # Without the bias: y - b.
    y0 = Buf([math.nan] * (t * dout), dtype)
    lib.cpu_forward(dtype, shape, x.c(), w.c(), phi.c(), psi.c(), 1.0, y0.m())
    want0 = array("f", (fx["y"][i] - fx["b"][i % dout] for i in range(t * dout)))
    close_to(f"{tag} forward y (no bias)", y0.f32(), want0, tol)
    for saved in (True, False):
        dx = Buf([math.nan] * (t * din), dtype)
        dphi, dpsi = array("f", [0.0] * (din * r)), array("f", [0.0] * (r * din))
        kw = dict(saved_u=u.buffer_info()[0], saved_u_len=len(u), saved_c=c.buffer_info()[0],
                  saved_c_len=len(c)) if saved else {}
        lib.cpu_backward(dtype, shape, x.c(), w.c(), phi.c(), psi.c(), 1.0, g.c(), dx.m(), dphi.buffer_info()[0],
                         len(dphi), dpsi.buffer_info()[0], len(dpsi), **kw)
        how = "saved" if saved else "recomputed"
        close_to(f"{tag} backward dx ({how})", dx.f32(), fx["dx"], tol)
        close_to(f"{tag} backward dphi ({how})", dphi, fx["dphi"], tol)
        close_to(f"{tag} backward dpsi ({how})", dpsi, fx["dpsi"], tol)
    # dx skipped; the pair's gradients accumulate (a second call doubles them).
    dphi, dpsi = array("f", fx["dphi"]), array("f", fx["dpsi"])
    lib.cpu_backward(dtype, shape, x.c(), w.c(), phi.c(), psi.c(), 1.0, g.c(), wegeft.mat(None, 0),
                     dphi.buffer_info()[0], len(dphi), dpsi.buffer_info()[0], len(dpsi))
    close_to(f"{tag} backward accumulates dphi", dphi, array("f", (2 * v for v in fx["dphi"])), tol)
    close_to(f"{tag} backward accumulates dpsi", dpsi, array("f", (2 * v for v in fx["dpsi"])), tol)
    # One adapter for every token: the batched multi-adapter forward is the layer.
    ym = Buf([math.nan] * (t * dout), dtype)
    lib.cpu_multi_forward(dtype, shape, 1, x.c(), w.c(), phi.ptr, len(phi.a), psi.ptr, len(psi.a), [1.0], [0] * t,
                          ym.m(), bias=b.ptr, bias_len=dout)
    close_to(f"{tag} multi-adapter forward y", ym.f32(), fx["y"], tol)
    expect_error(f"{tag} multi-adapter index past the stack", wegeft.ERR_INVALID, "adapter", lib.cpu_multi_forward,
                 dtype, shape, 1, x.c(), w.c(), phi.ptr, len(phi.a), psi.ptr, len(psi.a), [1.0], [1] * t, ym.m())
    wm = Buf(fx["W"], dtype)
    lib.cpu_merge(dtype, shape, wm.m(), phi.c(), psi.c(), 1.0)
    close_to(f"{tag} merge", wm.f32(), fx["W_merged"], tol)
    if dtype == wegeft.F32:
        lib.cpu_unmerge(dtype, shape, wm.m(), phi.c(), psi.c(), 1.0)
        close_to(f"{tag} unmerge", wm.f32(), fx["W"], 1e-4)


def expect_error(what, status, needle, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except wegeft.WegeftError as e:
        check(e.status == status and needle in e.message,
              f"{what}: got status {e.status} ({e}), want {status} with {needle!r} in the message")
        return
    check(False, f"{what}: no error")


def error_paths(lib):
    t, din, dout, r = 3, 5, 4, 2
    shape = wegeft.Shape(t, din, dout, r)
    x, w, phi, psi = (Buf([0.5] * n, wegeft.F32) for n in (t * din, dout * din, din * r, r * din))
    y = Buf([0.0] * (t * dout), wegeft.F32)
    fwd = lib.cpu_forward
    expect_error("x too short", wegeft.ERR_INVALID, "x:", fwd, wegeft.F32, shape,
                 wegeft.cmat(x.ptr, t * din - 1), w.c(), phi.c(), psi.c(), 1.0, y.m())
    expect_error("NULL W", wegeft.ERR_NULL, "W: NULL", fwd, wegeft.F32, shape, x.c(), wegeft.cmat(None, dout * din),
                 phi.c(), psi.c(), 1.0, y.m())
    expect_error("bad dtype", wegeft.ERR_INVALID, "unknown dtype code 7", fwd, 7, shape, x.c(), w.c(), phi.c(), psi.c(), 1.0, y.m())
    expect_error("NaN scale", wegeft.ERR_INVALID, "scale", fwd, wegeft.F32, shape, x.c(), w.c(), phi.c(), psi.c(),
                 math.nan, y.m())
    expect_error("ld < cols", wegeft.ERR_INVALID, "row stride", fwd, wegeft.F32, shape, x.c(ld=din - 1), w.c(), phi.c(),
                 psi.c(), 1.0, y.m())
    expect_error("y overlaps x", wegeft.ERR_INVALID, "overlaps", fwd, wegeft.F32, wegeft.Shape(t, din, din, r),
                 x.c(), Buf([0.5] * (din * din), wegeft.F32).c(), phi.c(), psi.c(), 1.0, x.m())
    # Singular I + phi psi: phi psi = -I on a rank-1 direction.
    one = wegeft.Shape(1, 1, 1, 1)
    w1, p1, q1 = Buf([1.0], wegeft.F32), Buf([1.0], wegeft.F32), Buf([-1.0], wegeft.F32)
    expect_error("singular unmerge", wegeft.ERR_NUMERICAL, "", lib.cpu_unmerge, wegeft.F32, one, w1.m(), p1.c(),
                 q1.c(), 1.0)
    check(list(w1.a) == [1.0], "a failed unmerge left W untouched")


def cuda_create(lib, require_gpu):
    try:
        with lib.cuda(0) as h:
            h.set_path(wegeft.PATH_TUNED)
            expect_error("bad path code", wegeft.ERR_INVALID, "path", h.set_path, 99)
        print("cuda: a handle on device 0 opened and closed")
    except wegeft.WegeftError as e:
        check(e.status == wegeft.ERR_NO_CUDA, f"cuda create failed without a clean reason: {e}")
        check(not require_gpu, f"--require-gpu but no CUDA: {e}")
        print(f"cuda: unavailable here ({e.message})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", help="libwegeft.so (default: wegeft.default_path())")
    ap.add_argument("--require-gpu", action="store_true", help="no CUDA device is a failure")
    ap.add_argument("fixtures", nargs="+")
    a = ap.parse_args()
    lib = wegeft.load(a.lib)
    print(f"libwegeft {lib.version()} at {lib.path}; built with CUDA: {lib.built_with_cuda()}")
    for path in a.fixtures:
        fx = read_fixture(path)
        for dtype in (wegeft.F32, wegeft.BF16):
            run_fixture(lib, os.path.basename(path), fx, dtype)
    error_paths(lib)
    cuda_create(lib, a.require_gpu)
    if FAILURES:
        print(f"{len(FAILURES)} failures")
        sys.exit(1)
    print(f"ok: {len(a.fixtures)} fixtures (f32, bf16), error paths")


if __name__ == "__main__":
    main()
