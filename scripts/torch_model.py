#!/usr/bin/env python3
"""PyTorch side-by-side for benches/model_cuda.rs: one training step (forward, backward, AdamW
over the adapter) of transformers' LlamaForCausalLM with SmolLM2-135M's config and random
weights, bf16, B=16, S=512, rank 8, targets q,v and all seven; tokens/s (median step time)
and peak device memory (torch.cuda.max_memory_allocated over the timed steps, weights
included). With --device cpu: f32 on the CPU, for `wegeft bench-step` (the CPU benchmark:
--batch 4 --seq 64 --targets qv --threads 2).

  * wegeft_ref  the official-style WeGeFT formulation, written from its formula: each target
                nn.Linear (W: d_out x d_in, frozen) uses its module type's in_proj (r x d_in)
                and out_proj (d_in x r), trainable and shared by all layers, and computes on
                every call
                    dW = (W in_proj^T) out_proj^T          (d_out x d_in)
                    y  = F.linear(x, W) + F.linear(x, dW)
  * peft_lora   PEFT LoRA (peft.get_peft_model, LoraConfig r=8, alpha=16, no dropout).
  * wegeft_torch  (with --wegeft-lib PATH) this crate's kernels inside the same transformers
                model: examples/python/wegeft_torch.py attach() (one pair per module type,
                the official scheme), through libwegeft.so's C ABI on PyTorch's stream.
The adapter's output half starts nonzero (out_proj / lora_B random) so that every product
does real work. Exit status 0, or 1 when a configuration failed (or, with
WEGEFT_REQUIRE_GPU=1, there is no device).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
        attention_bias=False, mlp_bias=False, torch_dtype="bfloat16",
    )


class WeGeFTLinear(nn.Module):
    """y = F.linear(x, W) + F.linear(x, dW), dW = (W in_proj^T) out_proj^T built per call;
    `pair` (in_proj, out_proj) is shared by every layer of the module type, as officially."""

    def __init__(self, base: nn.Linear, pair):
        super().__init__()
        self.base = base
        self._pair = pair  # a list: the parameters are registered once, on the model

    def forward(self, x):
        w = self.base.weight
        in_proj, out_proj = self._pair
        dw = (w @ in_proj.t()) @ out_proj.t()
        return F.linear(x, w) + F.linear(x, dw)


def build(kind, targets, r, dev, dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(smollm2_config())
    model = model.to(dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "wegeft_ref":
        pairs = nn.ParameterDict()
        for layer in model.model.layers:
            for name in targets:
                parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
                base = getattr(parent, name)
                if name + "_in" not in pairs:
                    d_in = base.in_features
                    kw = dict(device=base.weight.device, dtype=base.weight.dtype)
                    pairs[name + "_in"] = nn.Parameter(torch.randn(r, d_in, **kw) / d_in ** 0.5)
                    pairs[name + "_out"] = nn.Parameter(torch.randn(d_in, r, **kw) * 1e-3)
                setattr(parent, name, WeGeFTLinear(base, [pairs[name + "_in"], pairs[name + "_out"]]))
        model.wegeft_pairs = pairs
    elif kind == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                with torch.no_grad():
                    p.normal_(0.0, 1e-3)
    elif kind == "wegeft_torch":
        import wegeft_torch

        adapter = wegeft_torch.attach(model, targets=targets, rank=r)
        with torch.no_grad():
            for lin in adapter.out_projections.values():
                lin.weight.normal_(0.0, 1e-3)
    else:
        raise ValueError(kind)
    return model


def run(kind, targets, batch, seq, r, steps, dev, dtype):
    model = build(kind, targets, r, dev, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, 49152, (batch, seq), generator=g).to(dev)
    cuda = dev == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    step()  # warm-up
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    loss = None
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() if cuda else None
    n_params = sum(p.numel() for p in params)
    del model, opt, params
    if cuda:
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    return {"bench": "model_step", "impl": kind, "device": name, "batch": batch, "seq": seq,
            "rank": r, "targets": targets, "dtype": str(dtype)[6:], "step_s": step_s,
            "tokens_per_s": batch * seq / step_s, "peak_mem_bytes": peak, "loss": loss.item(),
            "trainable": n_params}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: f32 (the CPU benchmark of the Llama issue: --batch 4 --seq 64 --targets qv)")
    ap.add_argument("--targets", default="both", choices=("qv", "all", "both"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    ap.add_argument("--wegeft-lib", default=None,
                    help="libwegeft.so (built with --features cuda): also time wegeft_torch")
    a = ap.parse_args()
    kinds = ["wegeft_ref", "peft_lora"]
    load_failed = False
    if a.wegeft_lib:
        here = os.path.dirname(os.path.abspath(__file__))
        for d in (os.path.join(here, "python"), os.path.join(here, "..", "examples", "python")):
            if os.path.isfile(os.path.join(d, "wegeft_torch.py")):
                sys.path.insert(0, d)
                break
        try:  # our layer inside transformers is an extra row: the baselines run without it
            import wegeft_torch

            wegeft_torch.library(a.wegeft_lib)
            kinds.append("wegeft_torch")
        except Exception as e:
            print(f"wegeft_torch: FAILED to load ({type(e).__name__}: {e}); timing the baselines only", flush=True)
            load_failed = True
    if a.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device")
        sys.exit(1 if os.environ.get("WEGEFT_REQUIRE_GPU") == "1" else 0)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    failed = 0
    for targets in {"qv": [["q_proj", "v_proj"]], "all": [ALL], "both": [["q_proj", "v_proj"], ALL]}[a.targets]:
        for kind in kinds:
            try:
                row = run(kind, targets, a.batch, a.seq, a.rank, a.steps, a.device, dtype)
            except Exception as e:  # one failing configuration does not hide the others
                failed += 1
                print(f"{kind} {','.join(targets)}: FAILED: {type(e).__name__}: {e}", flush=True)
                continue
            print(json.dumps(row), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    sys.exit(1 if failed or load_failed else 0)


if __name__ == "__main__":
    main()
