"""wegeft_torch (PyTorch autograd over libwegeft.so) against the official formulation in PyTorch.

    python3 examples/python/test_wegeft_torch.py [--lib libwegeft.so] [--device cpu|cuda|all] [--bench]

The reference is the official GIFT formulation, `F.linear(x, W) + F.linear(x, s (W in_proj^T)
out_proj^T) + b`, differentiated by autograd in float64 from the same (rounded) inputs. Checks,
on each device: forward and the gradients of x, in_proj and out_proj (f32, bf16, f16; odd and
aligned shapes; with and without bias; scale 1 and 0.5; on CUDA every K-extended path and a
side stream); one pair shared by two layers (gradients summed); a small model fine-tuned for 8
AdamW steps next to the same model in plain PyTorch (losses and final pair); `attach` (official
state_dict keys, only the pair trainable, zero update at init); merge / unmerge; bad calls
raise ValueError naming the shapes; `multi_linear` (many adapters in one batch) per token
against each adapter's official layer; the custom ops under torch.library.opcheck and
torch.compile(fullgraph=True); on CUDA, forward + backward captured in a CUDA graph and
replayed. `--bench` (CUDA): forward + backward times against
`F.linear` (frozen) and the official formulation at T=8192, d=4096, r=64 and SmolLM2's shapes.
Prints "ok: ..." and exits 0 when every check passes; `--device cuda` (or WEGEFT_REQUIRE_GPU=1)
without a GPU fails.
"""

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wegeft  # noqa: E402
import wegeft_torch as wt  # noqa: E402

FAILURES = []
CHECKS = [0]


def check(cond, what):
    CHECKS[0] += 1
    if not cond:
        FAILURES.append(what)
        print("FAIL:", what, flush=True)


def rel(got, want):
    """max |got - want| / max |want| (float64)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


TOL = {torch.float32: 5e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def official(x, w, b, in_p, out_p, s):
    """The official GIFT layer: dW = s (W in_proj^T) out_proj^T built, two F.linear."""
    y = F.linear(x, w, b)
    return y + F.linear(x, s * (w @ in_p.t()) @ out_p.t())


def layer_case(dev, dtype, lead, d_in, d_out, r, bias, s, path=None, stream=None):
    g = torch.Generator().manual_seed(d_in * 1000 + d_out * 10 + r)
    rnd = lambda *sh: torch.randn(*sh, generator=g)  # noqa: E731
    x, w, in_p, out_p = rnd(*lead, d_in), rnd(d_out, d_in) / d_in ** 0.5, rnd(r, d_in) / d_in ** 0.5, rnd(d_in, r)
    b = rnd(d_out) if bias else None
    gy = rnd(*lead, d_out)
    cast = lambda t: None if t is None else t.to(dtype).to(dev)  # noqa: E731
    xs, ws, bs, ins, outs, gys = map(cast, (x, w, b, in_p, out_p, gy))
    # Reference: float64 from the rounded inputs.
    ref = [None if t is None else t.double().cpu().requires_grad_(k in (0, 2, 3))
           for k, t in enumerate((xs, ws, ins, outs))]
    xr, wr, inr, outr = ref
    br = None if bs is None else bs.double().cpu()
    yr = official(xr, wr, br, inr, outr, s)
    yr.backward(gys.double().cpu())
    # Ours.
    xo, ino, outo = (t.clone().requires_grad_(True) for t in (xs, ins, outs))
    if path is not None:
        wt.set_cuda_path(path)
    try:
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                yo = wt.wegeft_linear(xo, ws, bs, ino, outo, s)
                yo.backward(gys)
            torch.cuda.current_stream().wait_stream(stream)
        else:
            yo = wt.wegeft_linear(xo, ws, bs, ino, outo, s)
            yo.backward(gys)
    finally:
        if path is not None:
            wt.set_cuda_path(wegeft.PATH_AUTO)
    tol = TOL[dtype]
    tag = f"{dev} {str(dtype)[6:]} x{tuple(lead)} {d_in}->{d_out} r{r} bias={bias} s={s}" + \
        (f" path={path}" if path is not None else "") + (" side stream" if stream is not None else "")
    for name, got, want in (("y", yo, yr), ("dx", xo.grad, xr.grad), ("d in_proj", ino.grad, inr.grad),
                            ("d out_proj", outo.grad, outr.grad)):
        e = rel(got, want)
        check(e <= tol, f"{tag}: {name} rel err {e:.3g} > {tol}")
        check(got.dtype == dtype, f"{tag}: {name} dtype {got.dtype}")


def layer_tests(dev):
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for dtype in dtypes:
        layer_case(dev, dtype, (2, 19), 40, 24, 5, True, 1.0)
        layer_case(dev, dtype, (37,), 37, 23, 3, False, 0.5)
        layer_case(dev, dtype, (4, 16), 128, 96, 8, True, 2.0)
        layer_case(dev, dtype, (1,), 64, 64, 1, False, 1.0)  # one token, rank 1
    if dev == "cuda":
        for path in (wegeft.PATH_AUTO, wegeft.PATH_COMPOSED, wegeft.PATH_FUSED, wegeft.PATH_TUNED) + \
                ((wegeft.PATH_FUSED_SM90,) if torch.cuda.get_device_capability() == (9, 0) else ()):
            for dtype in dtypes:
                layer_case(dev, dtype, (4, 64), 256, 192, 16, True, 1.0, path=path)
        layer_case(dev, torch.bfloat16, (3, 50), 128, 96, 8, True, 1.0, stream=torch.cuda.Stream())
    print(f"{dev}: layer cases done", flush=True)


def shared_pair(dev):
    """Two layers with one pair: the pair's gradients are the sums."""
    torch.manual_seed(1)
    d, r = 48, 4
    w1, w2 = torch.randn(32, d) / 7, torch.randn(40, d) / 7
    in_p, out_p = torch.randn(r, d) / 7, torch.randn(d, r)
    x = torch.randn(10, d)
    inr, outr = in_p.double().requires_grad_(), out_p.double().requires_grad_()
    loss_r = official(x.double(), w1.double(), None, inr, outr, 1.0).pow(2).sum() + \
        official(x.double(), w2.double(), None, inr, outr, 1.0).sin().sum()
    loss_r.backward()
    ino, outo = in_p.to(dev).requires_grad_(), out_p.to(dev).requires_grad_()
    xd = x.to(dev)
    loss = wt.wegeft_linear(xd, w1.to(dev), None, ino, outo).pow(2).sum() + \
        wt.wegeft_linear(xd, w2.to(dev), None, ino, outo).sin().sum()
    loss.backward()
    check(rel(ino.grad, inr.grad) <= 5e-5, f"{dev} shared pair: d in_proj rel err {rel(ino.grad, inr.grad):.3g}")
    check(rel(outo.grad, outr.grad) <= 5e-5, f"{dev} shared pair: d out_proj rel err {rel(outo.grad, outr.grad):.3g}")


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)

    def forward(self, h):
        return h + self.o_proj(torch.tanh(self.q_proj(h)) * self.v_proj(h))


class Toy(nn.Module):
    def __init__(self, d=32, n=3, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        for blk in self.blocks:
            h = blk(h)
        return self.head(h)


def official_forward(model, in_p, out_p, s, ids):
    """The official formulation over the same frozen model (plain PyTorch)."""
    h = model.emb(ids)
    for blk in model.blocks:
        q = official(h, blk.q_proj.weight, blk.q_proj.bias, in_p["q_proj"], out_p["q_proj"], s)
        v = official(h, blk.v_proj.weight, None, in_p["v_proj"], out_p["v_proj"], s)
        h = h + blk.o_proj(torch.tanh(q) * v)
    return model.head(h)


def training(dev):
    torch.manual_seed(2)
    base = Toy().to(dev)
    ref = copy.deepcopy(base)
    for p in ref.parameters():
        p.requires_grad_(False)
    model = copy.deepcopy(base)
    adapter = wt.attach(model, targets=("q_proj", "v_proj"), rank=4, scale=0.5)
    keys = sorted(adapter.state_dict())
    want = sorted(f"{k}.{m}.weight" for k in ("in_projections", "out_projections") for m in ("q_proj", "v_proj"))
    check(keys == want, f"{dev} attach: state_dict keys {keys}")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    check(trainable == ["wegeft." + k for k in want], f"{dev} attach: trainable parameters {trainable}")
    check(all(p.requires_grad for p in adapter.parameters()), f"{dev} attach: the pair is not trainable")
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(3)).to(dev)
    with torch.no_grad():
        e = rel(model(ids), base(ids))
    check(e == 0.0 or e < 1e-6, f"{dev} attach: zero out_proj changes the output (rel {e:.3g})")
    in_p = {m: adapter.in_projections[m].weight.detach().clone().requires_grad_() for m in ("q_proj", "v_proj")}
    out_p = {m: adapter.out_projections[m].weight.detach().clone().requires_grad_() for m in ("q_proj", "v_proj")}
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.01)
    opt_r = torch.optim.AdamW(list(in_p.values()) + list(out_p.values()), lr=1e-2, weight_decay=0.01)
    ours, theirs = [], []
    for _ in range(8):
        for fwd, o, losses in ((lambda: model(ids), opt, ours),
                               (lambda: official_forward(ref, in_p, out_p, 0.5, ids), opt_r, theirs)):
            o.zero_grad()
            logits = fwd()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
            loss.backward()
            o.step()
            losses.append(loss.item())
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    check(worst <= 1e-4, f"{dev} training: losses {ours} vs {theirs} (rel {worst:.3g})")
    check(ours[-1] < ours[0], f"{dev} training: the loss did not fall ({ours[0]:.4f} -> {ours[-1]:.4f})")
    for m in ("q_proj", "v_proj"):
        for got, want, name in ((adapter.in_projections[m].weight, in_p[m], "in"), (adapter.out_projections[m].weight,
                                                                                    out_p[m], "out")):
            e = rel(got, want)
            check(e <= 1e-3, f"{dev} training: final {name}_proj.{m} rel err {e:.3g}")
    # Merge: the plain nn.Linear with W + s W phi psi gives the adapter's outputs; unmerge restores W.
    with torch.no_grad():
        y_adapter = model(ids)
        w_before = model.blocks[0].q_proj.base.weight.clone()
        for mod in model.modules():
            if isinstance(mod, wt.WegeftLinear):
                mod.merge()
        e = rel(model(ids), y_adapter)
        check(e <= 1e-5, f"{dev} merge: merged outputs rel err {e:.3g}")
        for mod in model.modules():
            if isinstance(mod, wt.WegeftLinear):
                mod.unmerge()
        e = rel(model.blocks[0].q_proj.base.weight, w_before)
        check(e <= 1e-5, f"{dev} unmerge: W rel err {e:.3g}")
    print(f"{dev}: training losses {[round(v, 5) for v in ours]}", flush=True)


def bad_calls(dev):
    x, w = torch.randn(3, 8, device=dev), torch.randn(6, 8, device=dev)
    in_p, out_p = torch.randn(2, 8, device=dev), torch.randn(8, 2, device=dev)

    def raises(what, needle, *args):
        try:
            wt.wegeft_linear(*args)
        except ValueError as e:
            check(needle in str(e), f"{dev} {what}: message {e!s} lacks {needle!r}")
            return
        check(False, f"{dev} {what}: no error")

    raises("x of the wrong width", "shapes disagree", torch.randn(3, 7, device=dev), w, None, in_p, out_p)
    raises("out_proj transposed", "shapes disagree", x, w, None, in_p, out_p.t())
    raises("bias length", "bias", x, w, torch.randn(5, device=dev), in_p, out_p)
    raises("mixed dtypes", "dtypes", x.double(), w, None, in_p, out_p)
    raises("trainable W", "frozen", x, w.clone().requires_grad_(), None, in_p, out_p)
    raises("NaN scale", "scale", x, w, None, in_p, out_p, float("nan"))
    if dev == "cuda":
        raises("mixed devices", "devices", x.cpu(), w, None, in_p, out_p)
    # Empty batch: an empty output, zero pair gradients.
    ino = in_p.clone().requires_grad_()
    y = wt.wegeft_linear(torch.randn(0, 8, device=dev), w, None, ino, out_p)
    y.sum().backward()
    check(y.shape == (0, 6) and ino.grad.abs().max().item() == 0.0, f"{dev} empty batch")


def multi_adapters(dev):
    """multi_linear: each token through its own adapter (or none), against the official layer per token."""
    g = torch.Generator().manual_seed(5)
    n_ad, r, d_in, d_out = 3, 6, 40, 24
    x = torch.randn(2, 9, d_in, generator=g)
    w, b = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5, torch.randn(d_out, generator=g)
    ins, outs = torch.randn(n_ad, r, d_in, generator=g) / d_in ** 0.5, torch.randn(n_ad, d_in, r, generator=g)
    scales = [0.5, 1.0, 2.0]
    idx = [(t % 4) - 1 for t in range(18)]
    for dtype in (torch.float32, torch.bfloat16):
        cast = lambda t: t.to(dtype).to(dev)  # noqa: E731
        y = wt.multi_linear(cast(x), cast(w), cast(b), cast(ins), cast(outs), scales, idx)
        xr, wr, br = (cast(t).double().cpu() for t in (x, w, b))
        rows = []
        for t, a in enumerate(idx):
            xt = xr.reshape(-1, d_in)[t]
            if a < 0:
                rows.append(F.linear(xt, wr, br))
            else:
                rows.append(official(xt, wr, br, cast(ins[a]).double().cpu(), cast(outs[a]).double().cpu(), scales[a]))
        want = torch.stack(rows).reshape(2, 9, d_out)
        e = rel(y, want)
        check(e <= TOL[dtype], f"{dev} multi_linear {str(dtype)[6:]}: rel err {e:.3g}")
    try:
        torch.library.opcheck(torch.ops.wegeft.multi_forward.default,
                              (x.reshape(-1, d_in).to(dev), w.to(dev), b.to(dev), ins.transpose(1, 2).to(dev),
                               outs.transpose(1, 2).to(dev), scales, torch.tensor(idx, dtype=torch.int32)))
        check(True, "")
    except Exception as e:
        check(False, f"{dev} opcheck wegeft::multi_forward: {type(e).__name__}: {str(e)[:300]}")
    # Under torch.compile (fullgraph): the same bits.
    torch._dynamo.reset()
    xs, wsd, bsd, insd, outsd = (t.to(dev) for t in (x, w, b, ins, outs))
    idx_t = torch.tensor(idx, dtype=torch.int32)
    with torch.no_grad():
        eager = wt.multi_linear(xs, wsd, bsd, insd, outsd, scales, idx_t)
        try:
            comp = torch.compile(wt.multi_linear, fullgraph=True, backend="aot_eager")(xs, wsd, bsd, insd, outsd,
                                                                                      scales, idx_t)
            check(torch.equal(comp, eager), f"{dev} multi_linear compiled differs from eager")
        except Exception as e:
            check(False, f"{dev} multi_linear under torch.compile: {type(e).__name__}: {str(e)[:300]}")
    try:
        wt.multi_linear(x.to(dev), w.to(dev), None, ins.to(dev), outs.to(dev), scales, [3] + idx[1:])
        check(False, f"{dev} multi_linear: an adapter index past the stack was accepted")
    except wegeft.WegeftError as e:
        check("adapter" in e.message, f"{dev} multi_linear bad index: {e}")
    try:
        wt.multi_linear(x.to(dev).requires_grad_(), w.to(dev), None, ins.to(dev), outs.to(dev), scales, idx)
        check(False, f"{dev} multi_linear: accepted an input that requires grad")
    except ValueError as e:
        check("no_grad" in str(e), f"{dev} multi_linear requires_grad: {e}")


def custom_ops(dev):
    """torch.library.opcheck on both ops (schema, fake tensors, autograd registration, AOT
    dispatch), then a small model under torch.compile(fullgraph=True): no graph break, and the
    compiled forward and backward equal eager mode."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 16, generator=g).to(dev).requires_grad_()
    w, b = (torch.randn(12, 16, generator=g) / 4).to(dev), torch.randn(12, generator=g).to(dev)
    in_p = (torch.randn(3, 16, generator=g) / 4).to(dev).requires_grad_()
    out_p = torch.randn(16, 3, generator=g).to(dev).requires_grad_()
    phi, psi = in_p.detach().t().contiguous().requires_grad_(), out_p.detach().t().contiguous().requires_grad_()
    for args in ((x, w, b, phi, psi, 0.5), (x, w, None, phi, psi, 1.0)):
        try:
            torch.library.opcheck(torch.ops.wegeft.forward.default, args)
            check(True, "")
        except Exception as e:  # opcheck raises on the first failed sub-test
            check(False, f"{dev} opcheck wegeft::forward (bias={args[2] is not None}): {type(e).__name__}: {e}")
    with torch.no_grad():
        y, u, c = torch.ops.wegeft.forward(x, w, b, phi, psi, 0.5)
    gy = torch.randn(7, 12, generator=g).to(dev)
    for need_dx in (True, False):
        try:
            torch.library.opcheck(torch.ops.wegeft.backward.default, (gy, x.detach(), w, phi.detach(), psi.detach(),
                                                                        0.5, u, c, need_dx))
            check(True, "")
        except Exception as e:
            check(False, f"{dev} opcheck wegeft::backward (need_dx={need_dx}): {type(e).__name__}: {e}")

    def layer(x, in_p, out_p):
        return torch.tanh(wt.wegeft_linear(x, w, b, in_p, out_p, 0.5)).pow(2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (layer, compiled):
        xs, ins, outs = (t.detach().clone().requires_grad_() for t in (x, in_p, out_p))
        try:
            loss = fn(xs, ins, outs)
            loss.backward()
            results.append((loss.detach(), xs.grad, ins.grad, outs.grad))
        except Exception as e:
            check(False, f"{dev} torch.compile(fullgraph=True): {type(e).__name__}: {str(e)[:300]}")
            return
    for name, a, e in zip(("loss", "dx", "d in_proj", "d out_proj"), *results):
        check(torch.equal(a, e), f"{dev} torch.compile: {name} differs from eager (rel {rel(a, e):.3g})")


def cuda_graph():
    """Forward + backward captured in a CUDA graph (torch.cuda.graph) and replayed on new inputs:
    the library's entry points must be capture-safe (stream-ordered scratch, no host sync on the
    default path); the replay must equal eager mode on the same inputs."""
    g = torch.Generator().manual_seed(8)
    dt, dev = torch.bfloat16, "cuda"
    mk = lambda *sh, s=1.0: (torch.randn(*sh, generator=g) * s).to(dt).to(dev)  # noqa: E731
    w, gy = mk(96, 128, s=0.1), mk(64, 96)
    x = mk(64, 128).requires_grad_()
    in_p, out_p = mk(8, 128, s=0.1).requires_grad_(), mk(128, 8).requires_grad_()
    params = (x, in_p, out_p)

    def step():
        wt.wegeft_linear(x, w, None, in_p, out_p).backward(gy)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for p in params:
                p.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as e:
        check(False, f"cuda graph capture of wegeft_linear forward + backward: {type(e).__name__}: {str(e)[:300]}")
        return
    grads = [p.grad for p in params]
    with torch.no_grad():
        x.copy_(mk(64, 128))
        in_p.copy_(mk(8, 128, s=0.1))
    graph.replay()
    torch.cuda.synchronize()
    got = [t.clone() for t in grads]
    xe, ine, oute = (p.detach().clone().requires_grad_() for p in params)
    wt.wegeft_linear(xe, w, None, ine, oute).backward(gy)
    for name, a, e in zip(("dx", "d in_proj", "d out_proj"), got, (xe.grad, ine.grad, oute.grad)):
        check(torch.equal(a, e), f"cuda graph replay: {name} differs from eager (rel {rel(a, e):.3g})")


def bench():
    """Forward + backward (dx and the pair's gradients) on CUDA events, median of 30 after warm-up."""
    dev, dt = "cuda", torch.bfloat16
    rows = []
    for t, d_in, d_out, r in ((8192, 4096, 4096, 64), (4096, 576, 576, 8), (4096, 576, 1536, 8),
                              (4096, 1536, 576, 8)):
        x = torch.randn(t, d_in, device=dev, dtype=dt, requires_grad=True)
        w = torch.randn(d_out, d_in, device=dev, dtype=dt) / d_in ** 0.5
        in_p = (torch.randn(r, d_in, device=dev, dtype=dt) / d_in ** 0.5).requires_grad_()
        out_p = (torch.randn(d_in, r, device=dev, dtype=dt) * 0.01).requires_grad_()
        g = torch.randn(t, d_out, device=dev, dtype=dt)
        fns = {"F.linear (frozen)": lambda: F.linear(x, w),
               "official (torch)": lambda: official(x, w, None, in_p, out_p, 1.0),
               "wegeft_torch": lambda: wt.wegeft_linear(x, w, None, in_p, out_p)}
        times = {}
        for name, fn in fns.items():
            for _ in range(3):
                fn().backward(g)
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(30)]
            for a, b in ev:
                a.record()
                fn().backward(g)
                b.record()
            torch.cuda.synchronize()
            times[name] = sorted(a.elapsed_time(b) for a, b in ev)[len(ev) // 2]
        base = times["F.linear (frozen)"]
        rows.append((f"T{t} {d_in}->{d_out} r{r}", times, base))
    print(f"\nwegeft_torch on {torch.cuda.get_device_name()}, bf16 forward + backward (dx and the pair's "
          "gradients), ms, median of 30 (ratio to the frozen F.linear's forward + dx)\n")
    print("| shape | " + " | ".join(rows[0][1]) + " |")
    print("|---" * (len(rows[0][1]) + 1) + "|")
    for shape, times, base in rows:
        print(f"| {shape} | " + " | ".join(f"{v:.3f} ({v / base:.2f}x)" for v in times.values()) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", help="libwegeft.so (default: wegeft.default_path())")
    ap.add_argument("--device", default="all", choices=("cpu", "cuda", "all"))
    ap.add_argument("--bench", action="store_true")
    a = ap.parse_args()
    lib = wt.library(a.lib)
    print(f"torch {torch.__version__}; libwegeft {lib.version()} at {lib.path}; CUDA in the library: "
          f"{lib.built_with_cuda()}; torch.cuda: {torch.cuda.is_available()}", flush=True)
    devices = ["cpu"] if a.device == "cpu" else ["cuda"] if a.device == "cuda" else \
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    if os.environ.get("WEGEFT_REQUIRE_GPU") == "1" and "cuda" not in devices:
        sys.exit("WEGEFT_REQUIRE_GPU=1 but torch sees no CUDA device")
    for dev in devices:
        layer_tests(dev)
        shared_pair(dev)
        training(dev)
        bad_calls(dev)
        multi_adapters(dev)
        custom_ops(dev)
    if "cuda" in devices:
        cuda_graph()
    if a.bench and "cuda" in devices:
        bench()
    if FAILURES:
        print(f"{len(FAILURES)} of {CHECKS[0]} checks failed")
        sys.exit(1)
    print(f"ok: {CHECKS[0]} checks on {', '.join(devices)}")


if __name__ == "__main__":
    main()
