#!/usr/bin/env python3
"""Writes the sliding-window attention reference data into tests/data/window/, all computed by
transformers and PyTorch (independent of this crate), for three tiny models whose weights are
already committed (no new weight files):

* mistral/config.json — tests/data/llama3/mistral/config.json (transformers' `MistralForCausalLM`)
  with `sliding_window: 7`; Mistral windows every layer. Weights: tests/data/llama3/hf/'s, loaded
  as scripts/llama3_reference.py's mistral_reference does (`LlamaForCausalLM.from_pretrained`, its
  state dict loaded into the Mistral model with strict=False, lm_head tied).
* qwen2/config.json — tests/data/qwen/qwen2/hf/config.json with `use_sliding_window: true`,
  `sliding_window: 6`, `max_window_layers: 1` and WITHOUT `layer_types` (written here from the
  original dict, not by `save_pretrained`, which would add it): transformers' Qwen2Config then
  derives layer_types from max_window_layers, layer i windowed iff i >= max_window_layers, so layer
  0 has full causal attention and layer 1 the window. Weights: tests/data/qwen/qwen2/hf/'s
  (`Qwen2ForCausalLM.from_pretrained` with this config).
* qwen3/config.json — tests/data/qwen/qwen3/hf/config.json with `use_sliding_window: true`,
  `sliding_window: 5` and an explicit `layer_types: ["sliding_attention", "full_attention"]` (layer
  0 windowed, layer 1 full; the config's `max_window_layers: 28` stays, and alone would window no
  layer: the explicit layer_types decides). Weights: tests/data/qwen/qwen3/hf/'s.
* <case>/logits.json — transformers' model (f32, eager attention) with that config on those
  weights, `reference_common.logits_reference`: for 3 id sequences (5, 48 and 300 ids), the mean
  next-token loss, the argmax per position and the full logits at the first, middle and last
  positions (the layout of tests/data/llama3/logits.json), with the torch/transformers versions.
* <case>/train_init.safetensors, train_final.safetensors, train.json — the WeGeFT fine-tune of
  `reference_common.train_reference` (float64, rank 4, all seven projections, 4 AdamW steps on
  2 x 24 ids: longer than every window, so the backward pass goes through the windowed attention)
  on that model.

The window's meaning (transformers 5.x, `masking_utils.sliding_window_overlay`, and'ed with the
causal mask by `sliding_window_causal_mask_function`): query i attends to key j iff
i - sliding_window < j <= i, i.e. each query sees `sliding_window` keys, itself included (window 7:
keys i-6..i). The script checks that rule on the mask function, and on every case that the
windowed model's logits equal (to 1e-6) those of the same weights with full causal attention at
every position < sliding_window, differ at position sliding_window (the first query whose window
leaves out key 0) and differ clearly on the 300-id sequence (max |diff| > 1e-3 max |logit|); that
the full-attention twin reproduces the committed non-windowed logits (to 1e-6)
(tests/data/llama3/mistral_logits.json, tests/data/qwen/qwen{2,3}/logits.json); and that the same
fine-tune of the twin has other losses at every step (for Qwen: exactly the committed
tests/data/qwen/qwen{2,3}/train.json ones).

The logits and the fine-tune come from scripts/reference_common.py, shared with
scripts/llama3_reference.py and scripts/qwen_reference.py.

    python -m venv /tmp/pt && /tmp/pt/bin/pip install torch transformers safetensors gguf
    /tmp/pt/bin/python scripts/window_reference.py
"""
import copy
import json
import os
import tempfile

import torch
from transformers import (LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)
from transformers.masking_utils import sliding_window_causal_mask_function

import reference_common as common

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "tests", "data")
OUT = os.path.join(DATA, "window")

CASES = {
    # name: base config.json, keys set on it, keys removed from it, config and model classes,
    # weights directory, committed logits of the same weights without a window, expected
    # layer_types (None: Mistral has none and windows every layer).
    "mistral": dict(config=os.path.join(DATA, "llama3", "mistral", "config.json"),
                    set=dict(sliding_window=7), remove=[],
                    config_cls=MistralConfig, model_cls=MistralForCausalLM,
                    weights=os.path.join(DATA, "llama3", "hf"),
                    full_logits=os.path.join(DATA, "llama3", "mistral_logits.json"),
                    layer_types=None),
    "qwen2": dict(config=os.path.join(DATA, "qwen", "qwen2", "hf", "config.json"),
                  set=dict(use_sliding_window=True, sliding_window=6, max_window_layers=1), remove=["layer_types"],
                  config_cls=Qwen2Config, model_cls=Qwen2ForCausalLM,
                  weights=os.path.join(DATA, "qwen", "qwen2", "hf"),
                  full_logits=os.path.join(DATA, "qwen", "qwen2", "logits.json"),
                  layer_types=["full_attention", "sliding_attention"]),
    "qwen3": dict(config=os.path.join(DATA, "qwen", "qwen3", "hf", "config.json"),
                  set=dict(use_sliding_window=True, sliding_window=5,
                           layer_types=["sliding_attention", "full_attention"]), remove=[],
                  config_cls=Qwen3Config, model_cls=Qwen3ForCausalLM,
                  weights=os.path.join(DATA, "qwen", "qwen3", "hf"),
                  full_logits=os.path.join(DATA, "qwen", "qwen3", "logits.json"),
                  layer_types=["sliding_attention", "full_attention"]),
}


def check_mask_rule():
    """transformers' sliding-window causal mask: key j visible to query i iff i - w < j <= i."""
    for w in (1, 5, 6, 7):
        f = sliding_window_causal_mask_function(w)
        for i in range(20):
            for j in range(20):
                got = bool(f(0, 0, torch.tensor(i), torch.tensor(j)))
                assert got == (i - w < j <= i), (w, i, j, got)
    print("mask rule: query i sees key j iff i - window < j <= i (window keys, itself included)")


def write_config(name):
    """The case's config.json: the base config's dict with the case's keys set / removed, written
    as scripts/qwen_reference.py writes qwen2/hf/config.json (indent 2, sorted keys)."""
    spec = CASES[name]
    c = json.load(open(spec["config"]))
    for k in spec["remove"]:
        assert k in c, (name, k)
        del c[k]
    c.update(spec["set"])
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, "config.json")
    json.dump(c, open(p, "w"), indent=2, sort_keys=True)
    open(p, "a").write("\n")
    return d


def load_model(name, d):
    """transformers' model of the case: config from d/config.json, f32, eager attention."""
    spec = CASES[name]
    cfg = spec["config_cls"].from_pretrained(d, attn_implementation="eager")
    if name == "mistral":
        # As scripts/llama3_reference.py's mistral_reference: Llama's weights into the Mistral model.
        llama = LlamaForCausalLM.from_pretrained(spec["weights"], dtype=torch.float32, attn_implementation="eager")
        m = MistralForCausalLM(cfg).float().eval()
        missing, unexpected = m.load_state_dict(llama.state_dict(), strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        m.tie_weights()
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    else:
        m = spec["model_cls"].from_pretrained(spec["weights"], config=cfg, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    assert m.config._attn_implementation == "eager", m.config._attn_implementation
    for p in m.parameters():
        assert p.dtype == torch.float32
    for bname, b in m.named_buffers():
        if bname.endswith("inv_freq"):
            assert b.dtype == torch.float32, bname
    return m


def full_attention_twin(m):
    """The same weights with full causal attention in every layer."""
    cfg = copy.deepcopy(m.config)
    cfg.sliding_window = None
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    if hasattr(cfg, "use_sliding_window"):
        cfg.use_sliding_window = False
    full = type(m)(cfg).float().eval()
    missing, unexpected = full.load_state_dict(m.state_dict(), strict=True)
    assert not missing and not unexpected
    full.tie_weights()
    return full


def window_checks(name, m, cases):
    """The window must matter where it should and nowhere else; the twin must be the committed
    full-attention reference."""
    w = m.config.sliding_window
    full = full_attention_twin(m)
    committed = json.load(open(CASES[name]["full_logits"]))["cases"]
    for c, ref in zip(cases, committed):
        ids = c["ids"]
        assert ids == ref["ids"], name
        lw = common.logits_of(m, ids)
        lf = common.logits_of(full, ids)
        # The twin reproduces the committed logits of the same weights without a window.
        twin = max((lf[p] - torch.tensor(ref["logits"][k])).abs().max().item() for k, p in enumerate(ref["positions"]))
        assert twin <= 1e-6, (name, len(ids), twin)
        # Our logits.json holds what this model computes.
        mine = max((lw[p] - torch.tensor(c["logits"][k])).abs().max().item() for k, p in enumerate(c["positions"]))
        assert mine == 0.0, (name, len(ids), mine)
        d = (lw - lf).abs().max(-1).values
        inside = d[:w].max().item()
        assert inside <= 1e-6, (name, len(ids), inside)
        line = (f"{name}: {len(ids)} ids: twin vs committed full logits {twin:.2e}; "
                f"positions < {w}: max |diff| {inside:.2e}")
        if len(ids) > w:
            at = d[w].item()
            beyond = d[w:].max().item()
            scale = lw.abs().max().item()
            line += (f"; position {w}: {at:.4f}; positions >= {w}: max |diff| {beyond:.4f} "
                     f"(max |logit| {scale:.3f}, ratio {beyond / scale:.4f}); "
                     f"loss {c['loss']:.6f} vs full {ref['loss']:.6f}")
            assert at > 1e-4, (name, len(ids), at)
            if len(ids) == 300:
                assert beyond > 1e-3 * scale, (name, beyond, scale)
        print(line)


def main():
    os.makedirs(OUT, exist_ok=True)
    check_mask_rule()
    versions = dict(torch=torch.__version__, transformers=__import__("transformers").__version__)
    for name, spec in CASES.items():
        d = write_config(name)
        saved = json.load(open(os.path.join(d, "config.json")))
        assert ("layer_types" in saved) == (name == "qwen3"), (name, saved.get("layer_types"))
        m = load_model(name, d)
        lt = getattr(m.config, "layer_types", None)
        print(f"{name}: transformers' config.layer_types {lt}, sliding_window {m.config.sliding_window}")
        assert lt == spec["layer_types"], (name, lt)
        assert m.config.sliding_window == spec["set"]["sliding_window"], m.config.sliding_window
        cases = common.logits_reference(m)
        json.dump(dict(cases=cases, versions=versions), open(os.path.join(d, "logits.json"), "w"))
        window_checks(name, m, cases)
        tr = common.train_reference(f"{name}-window", m, d)
        # The same fine-tune of the full-attention twin (written to a scratch directory): its
        # losses must differ from the windowed ones from the first step on.
        with tempfile.TemporaryDirectory() as scratch:
            full_losses = common.train_reference(f"{name}-full", full_attention_twin(m), scratch)["losses"]
        print(f"{name}-window losses: {tr['losses']}\n{name}-full losses:   {full_losses}")
        assert all(abs(a - b) > 1e-6 for a, b in zip(tr["losses"], full_losses)), (tr["losses"], full_losses)
        if name != "mistral":  # the committed fine-tune of the same weights without a window
            committed = json.load(open(os.path.join(os.path.dirname(spec["full_logits"]), "train.json")))["losses"]
            assert full_losses == committed, (full_losses, committed)
        json.dump(tr, open(os.path.join(d, "train.json"), "w"))
    common.print_sizes(OUT)


if __name__ == "__main__":
    main()
