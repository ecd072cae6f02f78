"""ctypes bindings to libwegeft.so, the crate's C ABI (include/wegeft.h). Standard library only.

    import wegeft
    lib = wegeft.load()                      # $WEGEFT_LIB, else target/{release,debug}/libwegeft.so
    lib.cpu_forward(wegeft.F32, wegeft.Shape(T, d_in, d_out, r),
                    x=wegeft.cmat(x_ptr, x_len), w=..., phi=..., psi=..., scale=1.0,
                    y=wegeft.mat(y_ptr, y_len))

Every call checks the returned status and raises `WegeftError` (with the library's message,
e.g. which argument had which shape) on failure. The functions take raw pointers (ints), so
any buffer works: ctypes arrays (`ctypes.addressof`), numpy (`a.ctypes.data`), torch
(`t.data_ptr()`). `wegeft_torch.py` builds a PyTorch autograd layer on top of this module.

Math (W frozen, d_out x d_in; phi d_in x r; psi r x d_in; scale s):
    C = s W phi, u = x psi^T;  y = x W^T + u C^T (+ b)
    backward: dx = G W + (G C) psi;  dphi += s W^T G^T u;  dpsi += (G C)^T x   (f32, accumulated)
    merge: W <- W + C psi;  unmerge: W <- W (I + s phi psi)^-1
The official GIFT code stores in_proj.weight = phi^T and out_proj.weight = psi^T.
"""

import ctypes
import os
from ctypes import POINTER, c_char_p, c_float, c_int, c_size_t, c_uint64, c_void_p

# Status codes (WEGEFT_OK, WEGEFT_ERR_*).
OK, ERR_NULL, ERR_INVALID, ERR_NUMERICAL, ERR_NO_CUDA, ERR_CUDA, ERR_PANIC = range(7)
# Storage dtypes (compute is f32; gradients of phi / psi are always f32).
F32, BF16, F16 = 0, 1, 2
# K-extended product paths of CudaHandle.set_path.
PATH_AUTO, PATH_FUSED, PATH_FUSED_SM90, PATH_COMPOSED, PATH_TUNED = range(5)


class WegeftError(RuntimeError):
    """A failed wegeft call: `status` is a WEGEFT_ERR_* code, `message` the library's text."""

    def __init__(self, function, status, status_name, message):
        super().__init__(f"{function}: {status_name}: {message}")
        self.function, self.status, self.message = function, status, message


class Shape(ctypes.Structure):
    """x: tokens x d_in, W: d_out x d_in, phi: d_in x rank, psi: rank x d_in, y: tokens x d_out."""

    _fields_ = [("tokens", c_size_t), ("d_in", c_size_t), ("d_out", c_size_t), ("rank", c_size_t)]


class ConstMat(ctypes.Structure):
    """A read-only host matrix: `len` elements at `data`, row i at element i * ld (0: ld = cols)."""

    _fields_ = [("data", c_void_p), ("len", c_size_t), ("ld", c_size_t)]


class Mat(ctypes.Structure):
    """A writable host matrix, as ConstMat."""

    _fields_ = [("data", c_void_p), ("len", c_size_t), ("ld", c_size_t)]


def cmat(ptr, length, ld=0):
    """A read-only host matrix argument (ptr: an int address; length in elements)."""
    return ConstMat(ptr, length, ld)


def mat(ptr, length, ld=0):
    """A writable host matrix argument; mat(None, 0) passes no matrix (e.g. no dx)."""
    return Mat(ptr, length, ld)


_FP = POINTER(c_float)
_S, _CM, _M = Shape, ConstMat, Mat
# name: (argument types); every function returns an int status except where noted.
_PROTOTYPES = {
    "wegeft_cpu_forward": (c_int, _S, _CM, _CM, c_void_p, c_size_t, _CM, _CM, c_float, _M, _FP, c_size_t, _FP, c_size_t),
    "wegeft_cpu_backward": (c_int, _S, _CM, _CM, _CM, _CM, c_float, _FP, c_size_t, _FP, c_size_t, _CM, _M, _FP,
                            c_size_t, _FP, c_size_t),
    "wegeft_cpu_merge": (c_int, _S, _M, _CM, _CM, c_float),
    "wegeft_cpu_unmerge": (c_int, _S, _M, _CM, _CM, c_float),
    "wegeft_cpu_lora_forward": (c_int, _S, _CM, _CM, c_void_p, c_size_t, _CM, _CM, c_float, _M, _FP, c_size_t),
    "wegeft_cpu_lora_backward": (c_int, _S, _CM, _CM, _CM, _CM, c_float, _FP, c_size_t, _CM, _M, _FP, c_size_t, _FP,
                                 c_size_t),
    "wegeft_cpu_multi_forward": (c_int, _S, c_size_t, _CM, _CM, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p,
                                 c_size_t, _FP, c_size_t, POINTER(ctypes.c_int32), c_size_t, _M),
    "wegeft_cuda_create": (c_int, POINTER(c_void_p)),
    "wegeft_cuda_destroy": (c_void_p,),
    "wegeft_cuda_set_path": (c_void_p, c_int),
    "wegeft_cuda_forward": (c_void_p, c_void_p, c_int, _S) + (c_uint64,) * 5 + (c_float,) + (c_uint64,) * 3,
    "wegeft_cuda_backward": (c_void_p, c_void_p, c_int, _S) + (c_uint64,) * 3 + (c_float,) + (c_uint64,) * 6,
    "wegeft_cuda_merge": (c_void_p, c_void_p, c_int, _S, c_uint64, c_uint64, c_uint64, c_float),
    "wegeft_cuda_unmerge": (c_void_p, c_void_p, c_int, _S, c_uint64, c_uint64, c_uint64, c_float),
    "wegeft_cuda_lora_forward": (c_void_p, c_void_p, c_int, _S) + (c_uint64,) * 5 + (c_float,) + (c_uint64,) * 2,
    "wegeft_cuda_lora_backward": (c_void_p, c_void_p, c_int, _S) + (c_uint64,) * 4 + (c_float,) + (c_uint64,) * 5,
    "wegeft_cuda_multi_forward": (c_void_p, c_void_p, c_int, _S, c_size_t) + (c_uint64,) * 5 +
                                 (_FP, c_size_t, POINTER(ctypes.c_int32), c_size_t, c_uint64),
}


def default_path():
    """$WEGEFT_LIB, else the newest libwegeft.so under this checkout's target/{release,debug}."""
    env = os.environ.get("WEGEFT_LIB")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    found = [os.path.join(root, "target", p, "libwegeft.so") for p in ("release", "debug")]
    found = [p for p in found if os.path.isfile(p)]
    if not found:
        raise FileNotFoundError(
            f"libwegeft.so not found under {root}/target (run `cargo build --release`, with "
            "`--features cuda` for the GPU entry points) and WEGEFT_LIB is not set")
    return max(found, key=os.path.getmtime)


def _fptr(p):
    """An optional f32 pointer argument from an int address (None / 0: NULL)."""
    return ctypes.cast(c_void_p(p or None), _FP)


def _host_array(values, ctype):
    """(pointer, length) of a host array: an (address, length) pair as is, else a sequence
    copied into a new ctypes array (kept alive by the returned pointer)."""
    if isinstance(values, tuple) and len(values) == 2 and isinstance(values[0], int):
        return ctypes.cast(c_void_p(values[0] or None), POINTER(ctype)), values[1]
    arr = (ctype * len(values))(*values)
    return ctypes.cast(arr, POINTER(ctype)), len(values)


class Library:
    """libwegeft.so, loaded. Methods mirror include/wegeft.h without the `wegeft_` prefix."""

    def __init__(self, path=None):
        self.path = path or default_path()
        lib = ctypes.CDLL(self.path)  # a CDLL releases the GIL during each call
        for name, args in _PROTOTYPES.items():
            f = getattr(lib, name)
            f.argtypes, f.restype = list(args), c_int
        for name in ("wegeft_last_error", "wegeft_version", "wegeft_status_name"):
            getattr(lib, name).restype = c_char_p
        lib.wegeft_status_name.argtypes = [c_int]
        lib.wegeft_built_with_cuda.restype = c_int
        self._lib = lib

    def version(self):
        return self._lib.wegeft_version().decode()

    def built_with_cuda(self):
        return bool(self._lib.wegeft_built_with_cuda())

    def _call(self, name, *args):
        status = getattr(self._lib, "wegeft_" + name)(*args)
        if status != OK:
            # The message is thread-local and this thread made the call.
            message = self._lib.wegeft_last_error().decode(errors="replace")
            raise WegeftError("wegeft_" + name, status, self._lib.wegeft_status_name(status).decode(), message)

    # ---- CPU (host pointers; matrices as cmat / mat) ----

    def cpu_forward(self, dtype, shape, x, w, phi, psi, scale, y, bias=None, bias_len=0, saved_u=None,
                    saved_u_len=0, saved_c=None, saved_c_len=0):
        """y = x W^T + u C^T (+ b). saved_u (T x r) / saved_c (d_out x r): f32 addresses or None."""
        self._call("cpu_forward", dtype, shape, x, w, bias, bias_len, phi, psi, scale, y, _fptr(saved_u),
                   saved_u_len, _fptr(saved_c), saved_c_len)

    def cpu_backward(self, dtype, shape, x, w, phi, psi, scale, g, dx, dphi, dphi_len, dpsi, dpsi_len,
                     saved_u=None, saved_u_len=0, saved_c=None, saved_c_len=0):
        """dx = G W + v psi (dx = mat(None, 0): skipped); dphi, dpsi: f32 addresses, accumulated."""
        self._call("cpu_backward", dtype, shape, x, w, phi, psi, scale, _fptr(saved_u), saved_u_len,
                   _fptr(saved_c), saved_c_len, g, dx, _fptr(dphi), dphi_len, _fptr(dpsi), dpsi_len)

    def cpu_merge(self, dtype, shape, w, phi, psi, scale):
        self._call("cpu_merge", dtype, shape, w, phi, psi, scale)

    def cpu_unmerge(self, dtype, shape, w, phi, psi, scale):
        self._call("cpu_unmerge", dtype, shape, w, phi, psi, scale)

    def cpu_lora_forward(self, dtype, shape, x, w, a, b, scale, y, bias=None, bias_len=0, saved_xa=None,
                         saved_xa_len=0):
        self._call("cpu_lora_forward", dtype, shape, x, w, bias, bias_len, a, b, scale, y, _fptr(saved_xa),
                   saved_xa_len)

    def cpu_lora_backward(self, dtype, shape, x, w, a, b, scale, g, dx, da, da_len, db, db_len, saved_xa=None,
                          saved_xa_len=0):
        self._call("cpu_lora_backward", dtype, shape, x, w, a, b, scale, _fptr(saved_xa), saved_xa_len, g, dx,
                   _fptr(da), da_len, _fptr(db), db_len)

    def cpu_multi_forward(self, dtype, shape, adapters, x, w, phi, phi_len, psi, psi_len, scales, adapter_of_token,
                          y, bias=None, bias_len=0):
        """Many adapters in one batch: y_t = (x_t + s_a (x_t psi_a^T) phi_a^T) W^T (+ b),
        a = adapter_of_token[t] (-1: none). phi / psi: addresses of the stacked pairs
        (adapters x d_in x rank, adapters x rank x d_in); scales, adapter_of_token: sequences,
        or (address, length) pairs of f32 / int32 host arrays."""
        sp, sn = _host_array(scales, c_float)
        ip, n = _host_array(adapter_of_token, ctypes.c_int32)
        self._call("cpu_multi_forward", dtype, shape, adapters, x, w, bias, bias_len, phi, phi_len, psi, psi_len, sp,
                   sn, ip, n, y)

    # ---- CUDA ----

    def cuda(self, device=0):
        """A CudaHandle on `device` (its primary context, the one PyTorch uses)."""
        return CudaHandle(self, device)


class CudaHandle:
    """wegeft_cuda_*: device pointers (ints), a CUstream (int or None: the legacy default stream).

    Work is queued on the stream and the call returns before it runs (unmerge waits for it).
    Pointers: contiguous row-major buffers of the call's dtype, 16-byte aligned; dphi / dpsi /
    dA / dB are f32. The library cannot check buffer sizes or the pointers' context: the caller
    must (wegeft_torch.py does).
    """

    def __init__(self, lib, device=0):
        self._lib = lib
        h = c_void_p()
        lib._call("cuda_create", device, ctypes.byref(h))
        self._h = h
        self.device = device

    def close(self):
        """Releases the handle (its queued work must have finished)."""
        if self._h:
            self._lib._call("cuda_destroy", self._h)
            self._h = c_void_p()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live(self):
        if not self._h:
            raise ValueError("CudaHandle used after close()")
        return self._h

    def set_path(self, path):
        """PATH_AUTO / PATH_FUSED / PATH_FUSED_SM90 / PATH_COMPOSED / PATH_TUNED for later calls."""
        self._lib._call("cuda_set_path", self._live(), path)

    def forward(self, stream, dtype, shape, x, w, bias, phi, psi, scale, u, c, y):
        """u = x psi^T and C = s W phi (dtype, kept for backward); y = x W^T + u C^T (+ b; 0: none)."""
        self._lib._call("cuda_forward", self._live(), stream, dtype, shape, x, w, bias, phi, psi, scale, u, c, y)

    def backward(self, stream, dtype, shape, x, w, psi, scale, u, c, g, dx, dphi, dpsi):
        """dx = G W + (G C) psi (dx 0: skipped); dphi += s W^T G^T u; dpsi += (G C)^T x (f32)."""
        self._lib._call("cuda_backward", self._live(), stream, dtype, shape, x, w, psi, scale, u, c, g, dx, dphi,
                        dpsi)

    def merge(self, stream, dtype, shape, w, phi, psi, scale):
        self._lib._call("cuda_merge", self._live(), stream, dtype, shape, w, phi, psi, scale)

    def unmerge(self, stream, dtype, shape, w, phi, psi, scale):
        self._lib._call("cuda_unmerge", self._live(), stream, dtype, shape, w, phi, psi, scale)

    def lora_forward(self, stream, dtype, shape, x, w, bias, a, b, scale, xa, y):
        self._lib._call("cuda_lora_forward", self._live(), stream, dtype, shape, x, w, bias, a, b, scale, xa, y)

    def lora_backward(self, stream, dtype, shape, x, w, a, b, scale, xa, g, dx, da, db):
        self._lib._call("cuda_lora_backward", self._live(), stream, dtype, shape, x, w, a, b, scale, xa, g, dx, da,
                        db)

    def multi_forward(self, stream, dtype, shape, adapters, x, w, bias, phi, psi, scales, adapter_of_token, y):
        """Many adapters in one batch (device pointers; scales and adapter_of_token on the host,
        as for Library.cpu_multi_forward, copied before the call returns)."""
        sp, sn = _host_array(scales, c_float)
        ip, n = _host_array(adapter_of_token, ctypes.c_int32)
        self._lib._call("cuda_multi_forward", self._live(), stream, dtype, shape, adapters, x, w, bias, phi, psi, sp,
                        sn, ip, n, y)


def load(path=None):
    """Loads libwegeft.so (see default_path)."""
    return Library(path)
