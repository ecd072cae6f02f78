"""WeGeFT layers for PyTorch over libwegeft.so (the crate's C ABI, through wegeft.py).

    import wegeft_torch as wt
    adapter = wt.attach(model, targets=("q_proj", "v_proj"), rank=8)   # freezes the base model
    opt = torch.optim.AdamW(adapter.parameters(), lr=2e-3)
    ... train model as usual (CPU tensors: the CPU layer; CUDA tensors: the CUDA kernels) ...
    safetensors.torch.save_file(adapter.state_dict(), "adapter.safetensors")  # official keys

`wegeft_linear(x, weight, bias, in_proj, out_proj, scale)` is the layer: with the official
GIFT parameters `in_proj` (r x d_in, = phi^T) and `out_proj` (d_in x r, = psi^T),

    y = x W^T + s (x out_proj) (W in_proj^T)^T (+ b)  =  F.linear(x, W + s (W in_proj^T) out_proj^T, b)

computed as one K-extended product (`W phi psi`, d_out x d_in, is never built); its backward
gives dx, d in_proj and d out_proj (W and b are frozen: asking for their gradient is an error).
Both are PyTorch custom ops (`torch.ops.wegeft.forward` / `backward`, autograd registered,
fake implementations for torch.compile). `WegeftLinear` wraps an `nn.Linear`; `Adapter` holds one pair per
module type in `in_projections` / `out_projections` (the official code's names, so its
`state_dict()` loads there and in `wegeft finetune --init-adapter`); `attach` puts them into a
model. `multi_linear` serves many adapters in one batch (each token its own adapter, one frozen
GEMM). Storage dtypes f32, bf16, f16 (all tensors of a call the same); compute f32.

On CUDA the kernels run on the tensors' device, on PyTorch's current stream (no
synchronisation). Scratch memory comes from the device's stream-ordered pool, next to
PyTorch's caching allocator.
"""

import math
import os
import sys
import threading
from typing import List, Optional, Tuple

import torch
from torch import nn

try:
    import wegeft
except ImportError:  # run from the source folder without `pip install`
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import wegeft

_DTYPES = {torch.float32: wegeft.F32, torch.bfloat16: wegeft.BF16, torch.float16: wegeft.F16}
_state = {"lib": None, "handles": {}, "path": wegeft.PATH_AUTO}
_lock = threading.Lock()


def library(path=None):
    """The loaded libwegeft.so (loaded once; `path` only matters on the first call)."""
    with _lock:
        if _state["lib"] is None:
            _state["lib"] = wegeft.load(path)
        return _state["lib"]


def set_cuda_path(path):
    """wegeft.PATH_* for every CUDA call from now on (default PATH_AUTO)."""
    with _lock:
        _state["path"] = path
        for h in _state["handles"].values():
            h.set_path(path)


def _handle(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    lib = library()
    with _lock:
        h = _state["handles"].get(index)
        if h is None:
            h = lib.cuda(index)  # lives until the process ends (PyTorch may still use the device)
            h.set_path(_state["path"])
            _state["handles"][index] = h
        return h


def _check(x, weight, bias, in_proj, out_proj, scale):
    """Shapes, dtypes and devices, checked before any pointer reaches the library."""
    def fail(msg):
        raise ValueError(f"wegeft_linear: {msg}")

    if weight.dim() != 2 or in_proj.dim() != 2 or out_proj.dim() != 2 or x.dim() < 1:
        fail(f"want x (..., d_in), weight (d_out, d_in), in_proj (r, d_in), out_proj (d_in, r); got x "
             f"{tuple(x.shape)}, weight {tuple(weight.shape)}, in_proj {tuple(in_proj.shape)}, out_proj "
             f"{tuple(out_proj.shape)}")
    d_out, d_in = weight.shape
    r = in_proj.shape[0]
    if x.shape[-1] != d_in or tuple(in_proj.shape) != (r, d_in) or tuple(out_proj.shape) != (d_in, r) or r == 0:
        fail(f"shapes disagree: x {tuple(x.shape)}, weight {tuple(weight.shape)} (d_out, d_in), in_proj "
             f"{tuple(in_proj.shape)} (r, d_in), out_proj {tuple(out_proj.shape)} (d_in, r)")
    if bias is not None and tuple(bias.shape) != (d_out,):
        fail(f"bias {tuple(bias.shape)}, want ({d_out},)")
    tensors = [("x", x), ("weight", weight), ("in_proj", in_proj), ("out_proj", out_proj)]
    if bias is not None:
        tensors.append(("bias", bias))
    if x.dtype not in _DTYPES or any(t.dtype != x.dtype for _, t in tensors):
        fail("dtypes: " + ", ".join(f"{n} {t.dtype}" for n, t in tensors) + " (want all float32, bfloat16 or "
             "float16)")
    if any(t.device != x.device for _, t in tensors) or x.device.type not in ("cpu", "cuda"):
        fail("devices: " + ", ".join(f"{n} {t.device}" for n, t in tensors) + " (want one CPU or CUDA device)")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        fail("weight and bias are frozen (no gradient is computed for them): call requires_grad_(False) on them")
    if not math.isfinite(scale):
        fail(f"scale {scale} is not finite")
    return d_in, d_out, r


def _dense(t):
    """Contiguous and 16-byte aligned (the CUDA entry points' requirement; a view into a larger
    tensor can start anywhere)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _c(t):
    return wegeft.cmat(t.data_ptr(), t.numel())


def _m(t):
    return wegeft.mat(t.data_ptr(), t.numel())


# The kernels as PyTorch custom ops (torch.library): autograd is registered on the forward op,
# and fake (meta) implementations give shapes to torch.compile, which traces them without a
# graph break. phi = in_proj^T and psi = out_proj^T are views made outside the ops, so
# PyTorch's own autograd maps their gradients back to in_proj / out_proj.


def _saved_dtype(x):
    """u and C as the forward keeps them: f32 from the CPU layer, the storage type on CUDA."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


@torch.library.custom_op("wegeft::forward", mutates_args=())
def _forward_op(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], phi: torch.Tensor,
                psi: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, u, C): y = x2 W^T + u C^T (+ b), u = x2 psi^T, C = s W phi (u, C kept for backward)."""
    (t, d_in), d_out, r = x2.shape, weight.shape[0], phi.shape[1]
    dev, sd = x2.device, _saved_dtype(x2)
    y = torch.empty(t, d_out, dtype=x2.dtype, device=dev)
    u = torch.empty(t, r, dtype=sd, device=dev)
    c = torch.empty(d_out, r, dtype=sd, device=dev)
    if t == 0:
        return y, u, c.zero_()
    x2, w, phi, psi = _dense(x2), _dense(weight), _dense(phi), _dense(psi)
    b = _dense(bias) if bias is not None else None
    dtype, shape = _DTYPES[x2.dtype], wegeft.Shape(t, d_in, d_out, r)
    if dev.type == "cpu":
        library().cpu_forward(dtype, shape, _c(x2), _c(w), _c(phi), _c(psi), scale, _m(y),
                              bias=b.data_ptr() if b is not None else None, bias_len=d_out if b is not None else 0,
                              saved_u=u.data_ptr(), saved_u_len=u.numel(), saved_c=c.data_ptr(), saved_c_len=c.numel())
    else:
        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev).cuda_stream
            _handle(dev).forward(stream, dtype, shape, x2.data_ptr(), w.data_ptr(), b.data_ptr() if b is not None else 0,
                                 phi.data_ptr(), psi.data_ptr(), scale, u.data_ptr(), c.data_ptr(), y.data_ptr())
    return y, u, c


@_forward_op.register_fake
def _(x2, weight, bias, phi, psi, scale):
    t, d_out, r, sd = x2.shape[0], weight.shape[0], phi.shape[1], _saved_dtype(x2)
    return x2.new_empty(t, d_out), x2.new_empty(t, r, dtype=sd), x2.new_empty(d_out, r, dtype=sd)


@torch.library.custom_op("wegeft::backward", mutates_args=())
def _backward_op(g: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, phi: torch.Tensor, psi: torch.Tensor,
                 scale: float, u: torch.Tensor, c: torch.Tensor,
                 need_dx: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dphi, dpsi): dx = G W + (G C) psi (0 rows unless need_dx), dphi = s W^T G^T u,
    dpsi = (G C)^T x2 (f32)."""
    (t, d_in), d_out, r, dev = x2.shape, weight.shape[0], phi.shape[1], x2.device
    dx = torch.empty(t if need_dx else 0, d_in, dtype=x2.dtype, device=dev)
    dphi = torch.zeros(d_in, r, dtype=torch.float32, device=dev)
    dpsi = torch.zeros(r, d_in, dtype=torch.float32, device=dev)
    if t == 0:
        return dx, dphi, dpsi
    g, x2, w, phi, psi = _dense(g.to(x2.dtype)), _dense(x2), _dense(weight), _dense(phi), _dense(psi)
    u, c = _dense(u), _dense(c)
    dtype, shape = _DTYPES[x2.dtype], wegeft.Shape(t, d_in, d_out, r)
    if dev.type == "cpu":
        library().cpu_backward(dtype, shape, _c(x2), _c(w), _c(phi), _c(psi), scale, _c(g),
                               _m(dx) if need_dx else wegeft.mat(None, 0), dphi.data_ptr(), dphi.numel(),
                               dpsi.data_ptr(), dpsi.numel(), saved_u=u.data_ptr(), saved_u_len=u.numel(),
                               saved_c=c.data_ptr(), saved_c_len=c.numel())
    else:
        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev).cuda_stream
            _handle(dev).backward(stream, dtype, shape, x2.data_ptr(), w.data_ptr(), psi.data_ptr(), scale,
                                  u.data_ptr(), c.data_ptr(), g.data_ptr(), dx.data_ptr() if need_dx else 0,
                                  dphi.data_ptr(), dpsi.data_ptr())
    return dx, dphi, dpsi


@_backward_op.register_fake
def _(g, x2, weight, phi, psi, scale, u, c, need_dx):
    (t, d_in), r = x2.shape, phi.shape[1]
    f32 = torch.float32
    return x2.new_empty(t if need_dx else 0, d_in), x2.new_empty(d_in, r, dtype=f32), x2.new_empty(r, d_in, dtype=f32)


def _setup_context(ctx, inputs, output):
    x2, weight, _, phi, psi, scale = inputs
    _, u, c = output
    ctx.save_for_backward(x2, weight, phi, psi, u, c)
    ctx.scale = scale


def _backward(ctx, gy, _gu, _gc):
    x2, weight, phi, psi, u, c = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dphi, dpsi = _backward_op(gy, x2, weight, phi, psi, ctx.scale, u, c, need[0])
    return (dx if need[0] else None, None, None, dphi.to(phi.dtype) if need[3] else None,
            dpsi.to(psi.dtype) if need[4] else None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def wegeft_linear(x, weight, bias, in_proj, out_proj, scale=1.0):
    """y = F.linear(x, W + s (W in_proj^T) out_proj^T, b), differentiable in x, in_proj, out_proj
    (the custom ops torch.ops.wegeft.forward / backward; torch.compile traces them)."""
    d_in, d_out, _ = _check(x, weight, bias, in_proj, out_proj, scale)
    y, _, _ = _forward_op(x.reshape(-1, d_in), weight, bias, in_proj.t(), out_proj.t(), float(scale))
    return y.reshape(*x.shape[:-1], d_out)


def merge_(weight, in_proj, out_proj, scale=1.0):
    """W <- W + s (W in_proj^T) out_proj^T in place (serving without the adapter's cost)."""
    _merge(weight, in_proj, out_proj, scale, unmerge=False)


def unmerge_(weight, in_proj, out_proj, scale=1.0):
    """W <- W (I + s phi psi)^-1 in place: exactly undoes merge_ (up to rounding)."""
    _merge(weight, in_proj, out_proj, scale, unmerge=True)


@torch.no_grad()
def _merge(weight, in_proj, out_proj, scale, unmerge):
    x = weight.new_empty(0, weight.shape[1])
    d_in, d_out, r = _check(x, weight.detach(), None, in_proj.detach(), out_proj.detach(), float(scale))
    if not (weight.is_contiguous() and weight.data_ptr() % 16 == 0):
        raise ValueError("merge_/unmerge_: weight must be contiguous and 16-byte aligned (it is updated in place)")
    phi, psi = _dense(in_proj.detach().t()), _dense(out_proj.detach().t())
    shape, dtype = wegeft.Shape(0, d_in, d_out, r), _DTYPES[weight.dtype]
    if weight.device.type == "cpu":
        f = library().cpu_unmerge if unmerge else library().cpu_merge
        f(dtype, shape, _m(weight), _c(phi), _c(psi), float(scale))
    else:
        with torch.cuda.device(weight.device):
            h, stream = _handle(weight.device), torch.cuda.current_stream(weight.device).cuda_stream
            f = h.unmerge if unmerge else h.merge
            f(stream, dtype, shape, weight.data_ptr(), phi.data_ptr(), psi.data_ptr(), float(scale))


def multi_linear(x, weight, bias, in_projs, out_projs, scales, adapter_of_token):
    """Many adapters in one batch (serving, no autograd): row t of `x` (..., d_in, flattened to
    T rows) goes through its own adapter `a = adapter_of_token[t]` (-1: none, the frozen
    layer), `in_projs[a]` (r x d_in) / `out_projs[a]` (d_in x r) in the official layout,
    stacked as (A, r, d_in) / (A, d_in, r), `scales[a]`:

        y_t = F.linear(x_t, W + s_a (W in_proj_a^T) out_proj_a^T, b)

    computed as one per-token input edit and one frozen GEMM for the whole batch.
    `adapter_of_token`: T ints (a list or an integer tensor; on CUDA keep it on the host, the
    library copies it). `stack(...)` builds the stacks from `Adapter`s."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, in_projs,
                                                                                   out_projs)):
        raise ValueError("multi_linear is for inference (no gradient): call it under torch.no_grad()")
    if in_projs.dim() != 3 or out_projs.dim() != 3:
        raise ValueError(f"multi_linear: in_projs {tuple(in_projs.shape)} and out_projs {tuple(out_projs.shape)} "
                         "must be stacks (A, r, d_in) and (A, d_in, r)")
    n_ad, r, d_in = in_projs.shape
    if n_ad == 0:
        raise ValueError("multi_linear: no adapters in the stacks")
    if tuple(out_projs.shape) != (n_ad, d_in, r):
        raise ValueError(f"multi_linear: out_projs {tuple(out_projs.shape)}, want ({n_ad}, {d_in}, {r})")
    d_in, d_out, r = _check(x, weight, bias, in_projs[0], out_projs[0], 1.0)
    scales = [float(v) for v in scales]
    if len(scales) != n_ad:
        raise ValueError(f"multi_linear: {len(scales)} scales for {n_ad} adapters")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    t = x2.shape[0]
    idx = torch.as_tensor(adapter_of_token, dtype=torch.int32, device="cpu").reshape(-1).contiguous()
    if idx.numel() != t:
        raise ValueError(f"multi_linear: {idx.numel()} adapter indices for {t} tokens")
    if t == 0:
        return torch.empty(*lead, d_out, dtype=x.dtype, device=x.device)
    y = _multi_op(x2, weight, bias, in_projs.transpose(1, 2), out_projs.transpose(1, 2), scales, idx)
    return y.reshape(*lead, d_out)


@torch.library.custom_op("wegeft::multi_forward", mutates_args=())
def _multi_op(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], phi: torch.Tensor,
              psi: torch.Tensor, scales: List[float], idx: torch.Tensor) -> torch.Tensor:
    """y_t = (x_t + s_a (x_t psi_a^T) phi_a^T) W^T (+ b), a = idx[t] (host int32); phi: (A, d_in,
    r), psi: (A, r, d_in)."""
    (t, d_in), d_out, (n_ad, _, r) = x2.shape, weight.shape[0], phi.shape
    y = torch.empty(t, d_out, dtype=x2.dtype, device=x2.device)
    x2, w, phi, psi = _dense(x2), _dense(weight), _dense(phi), _dense(psi)
    b = _dense(bias) if bias is not None else None
    idx = idx.to(device="cpu", dtype=torch.int32).contiguous()
    dtype, shape, ids = _DTYPES[x2.dtype], wegeft.Shape(t, d_in, d_out, r), (idx.data_ptr(), idx.numel())
    if x2.device.type == "cpu":
        library().cpu_multi_forward(dtype, shape, n_ad, _c(x2), _c(w), phi.data_ptr(), phi.numel(), psi.data_ptr(),
                                    psi.numel(), scales, ids, _m(y), bias=b.data_ptr() if b is not None else None,
                                    bias_len=d_out if b is not None else 0)
    else:
        with torch.cuda.device(x2.device):
            stream = torch.cuda.current_stream(x2.device).cuda_stream
            _handle(x2.device).multi_forward(stream, dtype, shape, n_ad, x2.data_ptr(), w.data_ptr(),
                                             b.data_ptr() if b is not None else 0, phi.data_ptr(), psi.data_ptr(),
                                             scales, ids, y.data_ptr())
    return y


@_multi_op.register_fake
def _(x2, weight, bias, phi, psi, scales, idx):
    return x2.new_empty(x2.shape[0], weight.shape[0])


def stack(adapters, module):
    """The `module` pairs of several `Adapter`s as multi_linear's stacks and scales."""
    ins = torch.stack([a.in_projections[module].weight.detach() for a in adapters])
    outs = torch.stack([a.out_projections[module].weight.detach() for a in adapters])
    return ins, outs, [a.scale for a in adapters]


class Adapter(nn.Module):
    """One WeGeFT pair per module type, in the official GIFT layout: `in_projections[m]` is an
    `nn.Linear(d_in, r)` (weight r x d_in = phi^T, `nn.Linear`'s default init) and
    `out_projections[m]` an `nn.Linear(r, d_in)` (weight d_in x r = psi^T, zero), both without
    bias; `scale` multiplies the update (1.0 in the official code, alpha / r in the PEFT fork)."""

    def __init__(self, dims, rank, scale=1.0, dtype=None, device=None):
        super().__init__()
        self.rank, self.scale = rank, float(scale)
        kw = dict(bias=False, dtype=dtype, device=device)
        self.in_projections = nn.ModuleDict({m: nn.Linear(d, rank, **kw) for m, d in dims.items()})
        self.out_projections = nn.ModuleDict({m: nn.Linear(rank, d, **kw) for m, d in dims.items()})
        for p in self.out_projections.values():
            nn.init.zeros_(p.weight)

    def pair(self, module):
        return self.in_projections[module].weight, self.out_projections[module].weight


class WegeftLinear(nn.Module):
    """An `nn.Linear` (frozen) adapted by the `module` pair of an `Adapter` (shared with every
    other layer of that module type)."""

    def __init__(self, base, adapter, module):
        super().__init__()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.base, self.module = base, module
        self._adapter = [adapter]  # not a submodule: the adapter's parameters belong to it alone
        self.merged = False

    @property
    def adapter(self):
        return self._adapter[0]

    def forward(self, x):
        if self.merged:
            return self.base(x)
        a = self.adapter
        return wegeft_linear(x, self.base.weight, self.base.bias, *a.pair(self.module), a.scale)

    def merge(self):
        """Folds the adapter into the base weight (forward becomes the plain `nn.Linear`)."""
        if not self.merged:
            merge_(self.base.weight, *self.adapter.pair(self.module), self.adapter.scale)
            self.merged = True

    def unmerge(self):
        if self.merged:
            unmerge_(self.base.weight, *self.adapter.pair(self.module), self.adapter.scale)
            self.merged = False


def attach(model, targets=("q_proj", "v_proj"), rank=8, scale=1.0):
    """Freezes `model`, replaces each `nn.Linear` child whose name is in `targets` by a
    `WegeftLinear` (one pair per name, shared by all layers, as the official code does) and
    returns the `Adapter` holding the pairs, also registered as the submodule `model.wegeft`
    (so `model.to(...)` moves it); its parameters are the model's only trainable ones, and
    `adapter.state_dict()` has the official key names."""
    if hasattr(model, "wegeft"):
        raise ValueError("attach: the model already has a `wegeft` attribute (attached twice?)")
    sites = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if name in targets and isinstance(child, nn.Linear)]
    if not sites:
        raise ValueError(f"attach: no nn.Linear named any of {list(targets)} in the model")
    dims, like = {}, {}
    for _, name, lin in sites:
        if dims.setdefault(name, lin.in_features) != lin.in_features:
            raise ValueError(f"attach: {name} layers have different d_in ({dims[name]} and {lin.in_features}); "
                             "one pair per module type needs one d_in")
        like.setdefault(name, lin.weight)
    for p in model.parameters():
        p.requires_grad_(False)
    first = next(iter(like.values()))
    adapter = Adapter(dims, rank, scale, dtype=first.dtype, device=first.device)
    for parent, name, lin in sites:
        setattr(parent, name, WegeftLinear(lin, adapter, name))
    model.add_module("wegeft", adapter)
    return adapter
