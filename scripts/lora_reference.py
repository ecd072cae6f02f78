#!/usr/bin/env python3
"""Runs the LoRA files `wegeft export-lora` writes in the LoRA runtimes they are for, PEFT and
llama.cpp, and writes what those computed into tests/data/lora/ for tests/lora_export.rs.

WeGeFT's update at a site is `W phi psi` (scale 1 in the official wrapper), a rank-r product, so
it is also a LoRA update `B A` with `A = psi` and `B = W phi` (src/adapter/lora.rs). For each tiny
model of the crate's reference data and its WeGeFT fine-tune (train_final.safetensors, written by
scripts/reference_common.train_reference: one pair per module type shared by all layers, all
seven projections, rank 4):

* llama3 — tests/data/llama3: Llama 3 (GQA, head_dim 16), q/k rows permuted in its GGUF;
* qwen3 — tests/data/qwen/qwen3: Qwen3 (q/k RMSNorms, head_dim 32 wider than hidden / heads),
  q/k rows in HF order in its GGUF;
* granite — tests/data/granite: Granite 3 (embedding, residual, attention and logit multipliers),
  permuted like Llama,

this script runs

* `wegeft export-lora --model <hf/> --adapter train_final.safetensors --out <family>/peft` (PEFT's
  LoRA layout) and `--model tiny.gguf --out <family>/lora.gguf` (llama.cpp's), kept in
  tests/data/lora/<family>/ as written (tests/lora_export.rs checks that the crate still writes
  the same factors);
* `wegeft merge --model tiny.gguf --adapter ... --out merged.gguf` (not kept);

and computes, for the 48-id sequence of the family's logits.json, the logits at every position of:

* reference — transformers' model (float64, eager attention) with every targeted weight replaced
  by the official wrapper's `W + (W in_proj^T) out_proj^T`: the WeGeFT model;
* peft — transformers' model (float32) with the exported LoRA loaded by peft's
  `PeftModel.from_pretrained`;
* llama_cpp — llama.cpp (llama-cpp-python, CPU) on tiny.gguf with the exported lora.gguf as its
  LoRA adapter (scale 1); the tiny GGUFs carry no vocabulary, so llama.cpp gets a copy with
  `tokenizer.ggml.model = "no_vocab"` added (and `<arch>.vocab_size` where the file lacks it);
* llama_cpp_merged — llama.cpp on the merged GGUF (same `no_vocab` copy);
* llama_cpp_base and reference_base — llama.cpp on tiny.gguf without an adapter, and transformers'
  model (float64) without one: the yardstick of llama.cpp's own arithmetic (f16 weights and f16
  activations in its matrix products).

It asserts: peft within 1e-5 of the reference (relative to the largest logit); llama.cpp with the
LoRA and on the merged file no further from the reference than 2x llama.cpp's own distance without
an adapter plus 1e-4 (relative); the adapter changes the reference logits by far more than that.
<family>/logits.json keeps positions 0, 24 and 47 of each, to 9 significant digits (and the
distances over all positions).

    python -m venv /tmp/pt && /tmp/pt/bin/pip install torch transformers peft gguf safetensors llama-cpp-python
    cargo build --release --bin wegeft
    /tmp/pt/bin/python scripts/lora_reference.py --wegeft target/release/wegeft

With `--smollm2 MODEL ADAPTER TEXT` it instead compares, on a real GGUF (SmolLM2-135M-Instruct
Q4_1) and a trained adapter, `wegeft score` with llama.cpp running the exported LoRA and the
merged GGUF, and prints a table (BENCHMARKS.md, "LoRA export").
"""
import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import tempfile

import numpy as np
import torch
import gguf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "tests", "data")
OUT = os.path.join(DATA, "lora")
FAMILIES = dict(llama3="llama3", qwen3=os.path.join("qwen", "qwen3"), granite="granite")
KEEP = [0, 24, 47]


def hf_logits(hf_dir, ids, dtype, adapter=None):
    """transformers' logits (every position) for `ids`; with `adapter` (an official-layout
    state dict), each targeted Linear's weight replaced by W + (W in_proj^T) out_proj^T."""
    m = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager")
    if adapter is not None:
        targets = sorted({k.split(".")[1] for k in adapter})
        n = 0
        with torch.no_grad():
            for name, mod in m.named_modules():
                t = name.rsplit(".", 1)[-1]
                if t in targets:
                    ip = adapter[f"in_projections.{t}.weight"].to(dtype)
                    op = adapter[f"out_projections.{t}.weight"].to(dtype)
                    w = mod.weight
                    w.copy_(w + (w @ ip.T) @ op.T)
                    n += 1
        assert n == len(targets) * m.config.num_hidden_layers, n
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].double().numpy()


def peft_logits(hf_dir, lora_dir, ids):
    from peft import PeftModel
    m = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    m = PeftModel.from_pretrained(m, lora_dir)
    n = sum(1 for name, _ in m.named_modules() if name.endswith("lora_A.default"))
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].double().numpy(), n


def with_no_vocab(src, dst):
    """A copy of the GGUF `src` with `tokenizer.ggml.model = "no_vocab"` added (llama.cpp needs
    the key; the tiny models have no vocabulary), all else as it was."""
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vt)
    w.add_string("tokenizer.ggml.model", "no_vocab")
    if f"{arch}.vocab_size" not in r.fields:
        # Without a vocabulary llama.cpp takes the vocabulary size from this key, which
        # llama.cpp's Llama converter writes and its Qwen converters do not.
        emb = next(t for t in r.tensors if t.name == "token_embd.weight")
        w.add_uint32(f"{arch}.vocab_size", int(emb.shape[1]))
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_logits(model, ids, lora=None):
    from llama_cpp import Llama
    kw = dict(lora_path=lora, lora_scale=1.0) if lora else {}
    llm = Llama(model_path=model, n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False, **kw)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


def dist(a, b, scale):
    return float(np.abs(a - b).max() / scale)


def run(wegeft, *args):
    subprocess.run([wegeft, *args], check=True, stderr=subprocess.DEVNULL)


def family(name, rel, wegeft, tmp):
    src = os.path.join(DATA, rel)
    out = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    hf, tiny, adapter = (os.path.join(src, f) for f in ("hf", "tiny.gguf", "train_final.safetensors"))
    run(wegeft, "export-lora", "--model", hf, "--adapter", adapter, "--out", os.path.join(out, "peft"))
    run(wegeft, "export-lora", "--model", tiny, "--adapter", adapter, "--out", os.path.join(out, "lora.gguf"))
    merged = os.path.join(tmp, f"{name}-merged.gguf")
    run(wegeft, "merge", "--model", tiny, "--adapter", adapter, "--out", merged)
    ids = json.load(open(os.path.join(src, "logits.json")))["cases"][1]["ids"]
    assert len(ids) == 48
    ad = load_file(adapter)
    got = dict(
        reference=hf_logits(hf, ids, torch.float64, ad),
        reference_base=hf_logits(hf, ids, torch.float64),
    )
    got["peft"], n_lora = peft_logits(hf, os.path.join(out, "peft"), ids)
    cpp_model, cpp_merged = os.path.join(tmp, f"{name}.gguf"), os.path.join(tmp, f"{name}-merged-vocab.gguf")
    with_no_vocab(tiny, cpp_model)
    with_no_vocab(merged, cpp_merged)
    got["llama_cpp"] = llama_cpp_logits(cpp_model, ids, os.path.join(out, "lora.gguf"))
    got["llama_cpp_merged"] = llama_cpp_logits(cpp_merged, ids)
    got["llama_cpp_base"] = llama_cpp_logits(cpp_model, ids)
    ref = got["reference"]
    scale = float(np.abs(ref).max())
    d = dict(
        adapter_effect=dist(ref, got["reference_base"], scale),
        peft=dist(got["peft"], ref, scale),
        llama_cpp=dist(got["llama_cpp"], ref, scale),
        llama_cpp_merged=dist(got["llama_cpp_merged"], ref, scale),
        llama_cpp_base=dist(got["llama_cpp_base"], got["reference_base"], scale),
    )
    print(f"{name}: {n_lora} PEFT LoRA layers; distances / max|logit| ({scale:.3f}):",
          {k: f"{v:.2e}" for k, v in d.items()})
    assert n_lora == 7 * 2, n_lora
    assert d["peft"] <= 1e-5, d
    for k in ("llama_cpp", "llama_cpp_merged"):
        assert d[k] <= 2 * d["llama_cpp_base"] + 1e-4, (k, d)
        assert d["adapter_effect"] >= 10 * d[k], (k, d)
    for k in ("reference", "peft", "llama_cpp"):
        assert (got[k].argmax(-1) == ref.argmax(-1)).mean() > 0.9, k
    record = dict(ids=ids, positions=KEEP, scale=scale, distances=d,
                  logits={k: [[float(f"{x:.9g}") for x in v[p]] for p in KEEP] for k, v in got.items()})
    with open(os.path.join(out, "logits.json"), "w") as f:
        json.dump(record, f)
    return d


def smollm2(wegeft, model, adapter, text):
    """By hand, on a real model (writes nothing): `wegeft score` with and without the adapter,
    against llama.cpp on the same GGUF with the exported LoRA, on the merged GGUF, and without an
    adapter. Prints, per pair, how many positions share the argmax and the largest difference of
    the last position's top-5 logits (wegeft's top 5)."""
    with tempfile.TemporaryDirectory() as tmp:
        lora, merged = os.path.join(tmp, "lora.gguf"), os.path.join(tmp, "merged.gguf")
        run(wegeft, "export-lora", "--model", model, "--adapter", adapter, "--out", lora)
        run(wegeft, "merge", "--model", model, "--adapter", adapter, "--out", merged)
        # The base with its adapted weights as F16 (a merge of the adapter with out_proj = 0):
        # llama.cpp multiplies quantized weights by quantized (Q8) activations, F16 weights by
        # F16 ones, so this separates the LoRA from the base's quantized products.
        from safetensors.torch import save_file
        zero = {k: (v.zero_() if k.startswith("out_projections.") else v) for k, v in load_file(adapter).items()}
        zero_path, base16 = os.path.join(tmp, "zero.safetensors"), os.path.join(tmp, "base16.gguf")
        save_file(zero, zero_path)
        run(wegeft, "merge", "--model", model, "--adapter", zero_path, "--out", base16)
        score = lambda *extra: json.loads(subprocess.run(
            [wegeft, "score", "--model", model, "--text", text, *extra], check=True, capture_output=True).stdout)
        ours = dict(base=score(), adapter=score("--adapter", adapter))
        ids = ours["base"]["ids"]
        cpp = dict(base=llama_cpp_logits(model, ids), lora=llama_cpp_logits(model, ids, lora),
                   merged=llama_cpp_logits(merged, ids), base16=llama_cpp_logits(base16, ids),
                   lora16=llama_cpp_logits(base16, ids, lora))
    rows = [("wegeft adapter", "wegeft base"), ("llama.cpp base", "wegeft base"), ("llama.cpp F16-base", "wegeft base"),
            ("llama.cpp + LoRA", "wegeft adapter"), ("llama.cpp F16-base + LoRA", "wegeft adapter"),
            ("llama.cpp merged", "wegeft adapter"), ("llama.cpp F16-base + LoRA", "llama.cpp merged")]
    print(f"{len(ids)} tokens: {text!r}")
    print("| compared | with | same argmax | max top-5 logit difference (last position) |")
    print("|---|---|---|---|")

    def view(name):
        kind, which = name.split(" ", 1)
        if kind == "wegeft":
            o = ours[which]
            return o["argmax"], {int(i): float(v) for i, v in o["top5_last"]}, None
        lg = cpp[{"base": "base", "+ LoRA": "lora", "merged": "merged", "F16-base": "base16",
                  "F16-base + LoRA": "lora16"}[which]]
        return lg.argmax(-1).tolist(), None, lg[-1]

    for a, b in rows:
        (am_a, top_a, last_a), (am_b, top_b, last_b) = view(a), view(b)
        top = top_b or top_a or {int(i): None for i in np.argsort(last_b)[-5:]}

        def get(t, last, i):
            return t.get(i) if t is not None else float(last[i])

        # Over the ids both sides have: two wegeft runs share only part of their top 5.
        pairs = [(get(top_a, last_a, i), get(top_b, last_b, i)) for i in top]
        diff = max((abs(x - y) for x, y in pairs if x is not None and y is not None), default=float("nan"))
        same = sum(x == y for x, y in zip(am_a, am_b))
        print(f"| {a} | {b} | {same}/{len(ids)} | {diff:.3f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wegeft", required=True, help="the wegeft binary (cargo build --release)")
    ap.add_argument("--smollm2", nargs=3, metavar=("MODEL", "ADAPTER", "TEXT"),
                    help="instead: compare with llama.cpp on a real GGUF and adapter (prints a table)")
    a = ap.parse_args()
    wegeft = os.path.abspath(a.wegeft)
    if a.smollm2:
        smollm2(wegeft, *a.smollm2)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, rel in FAMILIES.items():
            family(name, rel, wegeft, tmp)
    versions = {p: md.version(p) for p in ("torch", "transformers", "peft", "gguf", "llama_cpp_python")}
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump(versions, f, indent=1)
    print(versions)


if __name__ == "__main__":
    main()
