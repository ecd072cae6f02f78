#!/usr/bin/env python3
"""PyTorch side-by-side for `cargo bench --bench layer_cpu`: one layer's forward + backward in
f32 on the CPU, at the bench's shapes (T=512 d=576 r=8, T=1024 d=2048 r=64; d_in = d_out).

  * frozen      F.linear(x, W), backward dx only (W frozen): the floor;
  * official    the official formulation: dW = (W in_proj^T) out_proj^T built per call,
                F.linear(x, W) + F.linear(x, dW); dx, d in_proj, d out_proj;
  * lora        PEFT-style LoRA: F.linear(x, W) + s F.linear(F.linear(x, A), B); dx, dA, dB;
  * peft_lora   peft's LoraLayer around an nn.Linear (when peft imports);
  * wegeft_torch  this crate's CPU layer through examples/python/wegeft_torch.py (with --lib).

Times: median of interleaved rounds (each round runs every method once), ms; ratio to frozen.
    python3 scripts/torch_layer_cpu.py --threads 2 [--lib target/release/libwegeft.so]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--lib", default=None, help="libwegeft.so: also time wegeft_torch")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    wt = None
    if a.lib:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "python"))
        import wegeft_torch as wt

        wt.library(a.lib)
    try:
        from peft import LoraConfig, get_peft_model
    except Exception:  # peft is optional
        get_peft_model = None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; f32 forward + backward, ms "
          f"(median of {a.rounds} interleaved rounds); ratio to frozen")
    for t, d, r in ((512, 576, 8), (1024, 2048, 64)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(t, d, generator=g).requires_grad_()
        w = torch.randn(d, d, generator=g) / d ** 0.5
        in_p = (torch.randn(r, d, generator=g) / d ** 0.5).requires_grad_()
        out_p = (torch.randn(d, r, generator=g) * 0.01).requires_grad_()
        la = (torch.randn(r, d, generator=g) / d ** 0.5).requires_grad_()
        lb = (torch.randn(d, r, generator=g) * 0.01).requires_grad_()
        gy = torch.randn(t, d, generator=g)
        fns = {
            "frozen": lambda: F.linear(x, w),
            "official": lambda: F.linear(x, w) + F.linear(x, (w @ in_p.t()) @ out_p.t()),
            "lora": lambda: F.linear(x, w) + 2.0 * F.linear(F.linear(x, la), lb),
        }
        if get_peft_model is not None:
            holder = torch.nn.Module()
            holder.lin = torch.nn.Linear(d, d, bias=False)
            with torch.no_grad():
                holder.lin.weight.copy_(w)
            peft = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"]))
            with torch.no_grad():
                for n, p in peft.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0.0, 0.01)
            fns["peft_lora"] = lambda: peft.base_model.model.lin(x)
        if wt is not None:
            fns["wegeft_torch"] = lambda: wt.wegeft_linear(x, w, None, in_p, out_p)
        times = {k: [] for k in fns}
        for i in range(a.rounds + 3):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn().backward(gy)
                dt = time.perf_counter() - t0
                if i >= 3:
                    times[k].append(dt)
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        print(f"T{t} d{d} r{r}: " + ", ".join(f"{k} {v:.3f} ({v / med['frozen']:.2f}x)" for k, v in med.items()))


if __name__ == "__main__":
    main()
