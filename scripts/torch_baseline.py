#!/usr/bin/env python3
"""PyTorch side-by-side for the wegeft GPU benchmark (bf16, CUDA events, median of N; the L2
is flushed by a 256 MiB zero_() before every timed rep, outside the events, as in
benches/layer_cuda.rs).

For each shape it times, forward and forward+backward:
  * linear      plain F.linear(x, W): the frozen layer, the floor;
  * wegeft_ref  the official-style WeGeFT formulation: dW = s (W phi) psi materialised on
                every call, y = F.linear(x, W + dW) (phi, psi trainable; x requires grad);
  * lora_peft   PEFT-style LoRA: y = F.linear(x, W) + s * F.linear(F.linear(x, A), B);
  * peft_lora   the real peft.LoraLayer around an nn.Linear, when peft imports.
Shapes: T=8192 d=4096 r=64 and SmolLM2-135M's (T=4096: 576x576, 576->1536, 1536->576; r=8).
Each time is also given as a ratio to `linear` of the same kind (fwd, fwd+bwd); `linear
fwd+bwd` computes dx only (W is frozen), like wegeft's frozen fwd + frozen bwd dx.
Exit status: 0, or 1 when an op failed or (with WEGEFT_REQUIRE_GPU=1) there is no device.
"""
import os
import argparse
import json
import sys

import torch
import torch.nn.functional as F

SHAPES = [
    ("T8192 4096->4096 r64", 8192, 4096, 4096, 64),
    ("SmolLM2 T4096 576->576 r8", 4096, 576, 576, 8),
    ("SmolLM2 T4096 576->1536 r8", 4096, 576, 1536, 8),
    ("SmolLM2 T4096 1536->576 r8", 4096, 1536, 576, 8),
]


_FLUSH = None


def timed(fn, iters):
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ms = []
    a = torch.cuda.Event(enable_timing=True)
    b = torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        _FLUSH.zero_()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    ms.sort()
    return ms[len(ms) // 2]


def peft_lora_layer(peft, W, r):
    """peft's LoRA around a bias-free nn.Linear holding W (alpha = 2r: scale 2), built through
    get_peft_model, which every peft version takes (the LoraLayer constructors' arguments
    changed: peft on the GPU machine wants a `config` that 0.21 did not)."""
    dout, din = W.shape

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(din, dout, bias=False, device=W.device, dtype=W.dtype)

    m = One()
    with torch.no_grad():
        m.proj.weight.copy_(W)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(m, cfg)
    return pm.base_model.model.proj


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 1 if os.environ.get("WEGEFT_REQUIRE_GPU") == "1" else 0
    dev = torch.device("cuda")
    dt = torch.bfloat16
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    out = open(args.json, "w") if args.json else None
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}; bf16; median of {args.iters}; L2 flushed per rep")
    print(f"{'shape':<28} {'op':<24} {'ms':>10} {'x linear':>9}")
    failed = False
    try:
        import peft
    except Exception as e:  # peft is optional
        peft = None
        print(f"(peft not importable: {e})")
    shapes = SHAPES[1:2] if args.quick else SHAPES
    for label, T, din, dout, r in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        s = 2.0
        x = torch.randn(T, din, device=dev, dtype=dt, generator=g)
        W = torch.randn(dout, din, device=dev, dtype=dt, generator=g) / din**0.5
        phi = (torch.randn(din, r, device=dev, dtype=dt, generator=g) / din**0.5).requires_grad_()
        psi = (torch.randn(r, din, device=dev, dtype=dt, generator=g) / din**0.5).requires_grad_()
        A = (torch.randn(r, din, device=dev, dtype=dt, generator=g) / din**0.5).requires_grad_()
        B = (torch.randn(dout, r, device=dev, dtype=dt, generator=g) * 0.01).requires_grad_()
        G = torch.randn(T, dout, device=dev, dtype=dt, generator=g)
        xg = x.clone().requires_grad_()

        def linear_fwd():
            with torch.no_grad():
                F.linear(x, W)

        # Each timed fwd+bwd starts with no .grad (set to None: no kernel, no sync), so the
        # backward writes its gradients instead of adding them to the previous rep's (an extra
        # add kernel per leaf that wegeft's side does not run).
        def linear_fb():
            xg.grad = None
            F.linear(xg, W).backward(G)

        def wegeft_fwd():
            with torch.no_grad():
                F.linear(x, W + s * (W @ phi) @ psi)

        def wegeft_fb():
            xg.grad = phi.grad = psi.grad = None
            F.linear(xg, W + s * (W @ phi) @ psi).backward(G)

        def lora_fwd():
            with torch.no_grad():
                F.linear(x, W) + s * F.linear(F.linear(x, A), B)

        def lora_fb():
            xg.grad = A.grad = B.grad = None
            (F.linear(xg, W) + s * F.linear(F.linear(xg, A), B)).backward(G)

        ops = [
            ("linear fwd", linear_fwd),
            ("linear fwd+bwd", linear_fb),
            ("wegeft_ref fwd", wegeft_fwd),
            ("wegeft_ref fwd+bwd", wegeft_fb),
            ("lora_peft fwd", lora_fwd),
            ("lora_peft fwd+bwd", lora_fb),
        ]
        if peft is not None:
            try:
                layer = peft_lora_layer(peft, W, r)
                # peft starts B at zero; time it on random values like everything else.
                with torch.no_grad():
                    layer.lora_B["default"].weight.copy_(B)
                    layer.lora_A["default"].weight.copy_(A)

                def peft_fwd():
                    with torch.no_grad():
                        layer(x)

                def peft_fb():
                    xg.grad = None
                    layer.zero_grad(set_to_none=True)
                    layer(xg).backward(G)

                ops += [("peft_lora fwd", peft_fwd), ("peft_lora fwd+bwd", peft_fb)]
            except Exception as e:
                print(f"(peft LoraLayer failed: {e})")
        floor = {}
        for op, fn in ops:
            try:
                ms = timed(fn, args.iters)
                kind = op.split(" ", 1)[1]  # "fwd" or "fwd+bwd"
                if op.startswith("linear "):
                    floor[kind] = ms
                ratio = ms / floor[kind] if kind in floor else None
                rs = f"{ratio:>9.3f}" if ratio is not None else f"{'-':>9}"
                print(f"{label:<28} {op:<24} {ms:>10.4f} {rs}", flush=True)
                if out:
                    out.write(json.dumps({"device": name, "shape": label, "op": op, "ms": ms,
                                          "ratio_to_linear": ratio, "iters": args.iters}) + "\n")
                    out.flush()
            except Exception as e:
                failed = True
                print(f"{label:<28} {op:<24} FAILED: {e}", flush=True)
        del x, W, phi, psi, A, B, G, xg
        torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
