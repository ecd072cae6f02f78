#!/usr/bin/env python3
"""One adapter, three stacks: this crate's Rust model, transformers + wegeft_torch, and
transformers on the weights `wegeft merge` wrote.

    python3 scripts/crosscheck_transformers.py --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--wegeft target/release/wegeft] [--lib target/release/libwegeft.so] [--d-in 576]

1. A random WeGeFT adapter for q_proj and v_proj (rank 8, out_proj nonzero) is made in PyTorch
   by `wegeft_torch.Adapter` and saved with `safetensors.torch.save_file(adapter.state_dict())`
   (the official key names). `--d-in` is the model's hidden size (SmolLM2-135M: 576).
2. `wegeft score --adapter` scores a prompt with the Rust model on the GGUF (CPU).
3. `wegeft merge` with an all-zero adapter writes the base model as a Hugging Face directory;
   transformers' LlamaForCausalLM loads it, `wegeft_torch.attach` + `load_state_dict` add the
   adapter (this crate's CPU layer inside PyTorch), and it scores the same tokens.
4. `wegeft merge` with the adapter writes W + W phi psi; transformers scores it plainly.
All three must agree: the same argmax at every position, loss and last-position top-5 logits
within 1e-4 relative (of the largest logit). Needs torch, transformers and safetensors.
Exit status 0 when they agree.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "python"))
import wegeft_torch as wt  # noqa: E402

TARGETS = ("q_proj", "v_proj")


def transformers_score(hf_dir, ids, adapter_file=None):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if adapter_file:
        adapter = wt.attach(model, targets=TARGETS, rank=8)
        adapter.load_state_dict(load_file(adapter_file))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    top = torch.topk(logits[-1], 5)
    return {"loss": F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item(), "argmax": logits.argmax(-1).tolist(),
            "top5_last": [[int(i), float(v)] for v, i in zip(top.values, top.indices)]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a SmolLM2 / Llama GGUF file")
    ap.add_argument("--wegeft", default=os.path.join(ROOT, "target", "release", "wegeft"))
    ap.add_argument("--lib", default=None, help="libwegeft.so (default: wegeft.default_path())")
    ap.add_argument("--d-in", type=int, default=576, help="the model's hidden size")
    ap.add_argument("--text", default="What is 345 + 678? The answer is")
    a = ap.parse_args()
    from safetensors.torch import save_file

    wt.library(a.lib)
    tmp = tempfile.mkdtemp(prefix="wegeft-xcheck-")

    def wegeft(*args):
        return subprocess.run([a.wegeft, *args], check=True, capture_output=True, text=True).stdout

    torch.manual_seed(0)
    adapter = wt.Adapter({m: a.d_in for m in TARGETS}, rank=8)
    with torch.no_grad():
        for lin in adapter.out_projections.values():
            lin.weight.normal_(0.0, 0.02)
    files = {}
    for name, sd in (("adapter", adapter.state_dict()),
                     ("zero", {k: torch.zeros_like(v) for k, v in adapter.state_dict().items()})):
        files[name] = os.path.join(tmp, f"{name}.safetensors")
        save_file(sd, files[name])
    rust = json.loads(wegeft("score", "--model", a.model, "--device", "cpu", "--adapter", files["adapter"], "--text",
                             a.text))
    ids = rust["ids"]
    for name in ("zero", "adapter"):
        wegeft("merge", "--model", a.model, "--device", "cpu", "--adapter", files[name], "--out",
               os.path.join(tmp, f"hf_{name}"))
    runs = {
        "wegeft score (Rust, GGUF)": rust,
        "transformers + wegeft_torch.attach": transformers_score(os.path.join(tmp, "hf_zero"), ids, files["adapter"]),
        "transformers on `wegeft merge` output": transformers_score(os.path.join(tmp, "hf_adapter"), ids),
    }
    ok = True
    want = rust
    scale = max(abs(v) for _, v in want["top5_last"])
    print(f"{len(ids)} tokens, rank-8 adapter on {', '.join(TARGETS)} made and saved in PyTorch")
    for name, got in runs.items():
        top_ids = [i for i, _ in got["top5_last"]] == [i for i, _ in want["top5_last"]]
        top_err = max(abs(g - w) for (_, g), (_, w) in zip(got["top5_last"], want["top5_last"])) / scale
        loss_err = abs(got["loss"] - want["loss"]) / abs(want["loss"])
        agree = got["argmax"] == want["argmax"] and top_ids and top_err <= 1e-4 and loss_err <= 1e-4
        ok &= agree
        print(f"{name:<40} loss {got['loss']:.6f} (rel {loss_err:.1e}), top-5 {[i for i, _ in got['top5_last']]} "
              f"(max rel {top_err:.1e}), argmax {'same' if got['argmax'] == want['argmax'] else 'DIFFERS'}: "
              f"{'ok' if agree else 'MISMATCH'}")
    shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
