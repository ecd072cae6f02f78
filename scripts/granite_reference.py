#!/usr/bin/env python3
"""Writes the IBM Granite reference data of the crate's Granite tests into tests/data/granite/, all
computed by implementations independent of this crate (transformers, PyTorch, gguf-py):

* hf/ — a tiny `GraniteForCausalLM` of Granite 3's dense architecture: Llama's block (GQA, no
  biases, tied embeddings, plain RoPE with theta 1e4, rms_norm_eps 1e-6; head_dim 16 = hidden /
  heads, no head_dim key) plus Granite's four scalars, each chosen so that it matters:
  `embedding_multiplier` 12 (the input embeddings times it), `residual_multiplier` 0.22 (each
  attention / MLP branch output times it before the residual add), `attention_multiplier` 0.09
  (the attention score scale, in place of 1 / sqrt(head_dim) = 0.25) and `logits_scaling` 6 (the
  logits divided by it). Random weights (those of scripts/reference_common.py's tiny_model),
  stored as f16, saved by transformers (`save_pretrained`, safetensors). The script checks that
  the reloaded hf/ gives the reference logits exactly.
* tiny.gguf — the same weights as llama.cpp's converter (convert_hf_to_gguf.py /
  conversion/granite.py, `class GraniteModel(LlamaModel)` with model_arch MODEL_ARCH.GRANITE)
  writes them with gguf-py's GGUFWriter: architecture "granite", the granite.* keys of
  TextModel.set_gguf_parameters plus LlamaModel's `vocab_size` and `rope.dimension_count` (no
  key_length/value_length: GraniteModel.set_gguf_parameters pops any head_dim, and this config has
  none), then GraniteModel's four scalars under their llama.cpp names, in the converter's order:
  `granite.attention.scale` (attention_multiplier, add_attention_scale), `granite.embedding_scale`
  (embedding_multiplier, add_embedding_scale), `granite.residual_scale` (residual_multiplier,
  add_residual_scale), `granite.logit_scale` (logits_scaling, add_logit_scale), all f32. q/k rows
  PERMUTED as LlamaModel.modify_tensors does (GraniteModel keeps undo_permute = True), tensor
  names from gguf-py's own TensorNameMap, no `output.weight` (tied); f16 matrices, f32 norms. As
  for tests/data/llama3/tiny.gguf, the only tokenizer keys are tokenizer.ggml.bos_token_id /
  eos_token_id. The script reloads it with gguf-py's GGUFReader and checks the four keys.
* logits.json — transformers' `GraniteForCausalLM` (f32, eager attention) on those weights: for
  each id sequence, the mean next-token loss, the argmax per position and the full logits at a few
  positions (the layout of tests/data/qwen/qwen2/logits.json), plus the rope parameters, the four
  multipliers and the library versions.
* train_init.safetensors, train_final.safetensors, train.json — the WeGeFT fine-tune of
  scripts/llama3_reference.py and scripts/qwen_reference.py (scripts/reference_common.py's
  train_reference: one in_proj/out_proj pair per module type shared by all layers,
  `dW = (W in_proj^T) out_proj^T`, all seven projections, rank 4; float64 PyTorch autograd and
  `torch.optim.AdamW`, 4 steps, same seeds and data construction) on that model, the multipliers
  in place. train.json also holds `f32_update_dist`: per target, how far PyTorch's own float32 run
  of the same fine-tune lands from the float64 one (reference_common.f32_update_distances). The
  flat attention (0.09 in place of 0.25) makes v_proj's update ill-conditioned: float32 PyTorch
  misses it by about 3e-5 of its size where the other targets are near 1e-6; tests/granite.rs
  scales its tolerance by this.

Checks the script asserts (and prints): each multiplier matters — the same weights with that one
multiplier set to 1.0 (and, for attention_multiplier, also to Llama's 1 / sqrt(head_dim)) change
the logits of the 48-id case by more than 1e-3 of their largest magnitude; and the identity the
crate uses to run Granite as a plain Llama ("folding" the scalars into the weights): a
`LlamaForCausalLM` of the same config without the multipliers (tied embeddings) whose weights are
Granite's with q_proj *= attention_multiplier * sqrt(head_dim), o_proj and down_proj *=
residual_multiplier, embed_tokens *= embedding_multiplier and the final norm /=
(embedding_multiplier * logits_scaling) (the tied head sees the scaled embeddings) gives Granite's
logits to within 1e-4 of their largest magnitude on all three cases.

The tiny model's weights, the hf/ save, the logits, the fine-tune and the GGUF keys common to
llama.cpp's converters come from scripts/reference_common.py, shared with the other reference
scripts.

    python -m venv /tmp/pt && /tmp/pt/bin/pip install torch transformers gguf safetensors
    /tmp/pt/bin/python scripts/granite_reference.py
"""
import copy
import json
import math
import os

import numpy as np
import torch
import gguf
from transformers import GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

import reference_common as common

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "data", "granite")

MULTIPLIERS = dict(
    embedding_multiplier=12.0,
    residual_multiplier=0.22,
    attention_multiplier=0.09,  # != 1 / sqrt(head_dim) = 0.25
    logits_scaling=6.0,
)
BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    tie_word_embeddings=True,  # as Granite 3's dense models
    attention_bias=False,
    mlp_bias=False,
)
CONFIG = dict(BASE, **MULTIPLIERS)
ROPE = dict(rope_type="default", rope_theta=1e4)
HEAD_DIM = BASE["hidden_size"] // BASE["num_attention_heads"]
# The llama.cpp GGUF key of each multiplier: (gguf-py writer method, key).
GGUF_KEYS = dict(
    attention_multiplier=("add_attention_scale", "granite.attention.scale"),
    embedding_multiplier=("add_embedding_scale", "granite.embedding_scale"),
    residual_multiplier=("add_residual_scale", "granite.residual_scale"),
    logits_scaling=("add_logit_scale", "granite.logit_scale"),
)


def tiny_model():
    cfg, model = common.tiny_model(GraniteConfig, GraniteForCausalLM, CONFIG, ROPE)
    assert all(getattr(cfg, k) == v for k, v in MULTIPLIERS.items())
    attn = model.model.layers[0].self_attn
    assert attn.head_dim == HEAD_DIM and attn.scaling == MULTIPLIERS["attention_multiplier"], attn.scaling
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return cfg, model


def write_gguf(cfg, model):
    """conversion/granite.py's GraniteModel (a LlamaModel) with --outtype f16."""
    arch = gguf.MODEL_ARCH.GRANITE
    assert gguf.MODEL_ARCH_NAMES[arch] == "granite"
    # GraniteModel.set_gguf_parameters pops head_dim before TextModel's, which so writes no
    # key_length / value_length; the saved config.json has none anyway.
    assert "head_dim" not in json.load(open(os.path.join(OUT, "hf", "config.json")))
    assert cfg.hidden_size // cfg.num_attention_heads == HEAD_DIM

    def scalars(w):
        # GraniteModel.set_gguf_parameters, after LlamaModel's (each only when non-zero).
        for hf_key, (method, key) in GGUF_KEYS.items():
            getattr(w, method)(getattr(cfg, hf_key))
            assert key in w.kv_data[0], (method, key, list(w.kv_data[0]))

    # LlamaModel.modify_tensors (undo_permute = True; GraniteModel does not override it).
    return common.llama_model_gguf(os.path.join(OUT, "tiny.gguf"), arch, "tiny-granite-reference", cfg,
                                   ROPE["rope_theta"], model, scalars)


def check_gguf(model):
    """gguf-py's GGUFReader reads back the architecture, the four scalars (as f32) and the
    weights (q/k rows permuted, the rest as they are)."""
    r = gguf.GGUFReader(os.path.join(OUT, "tiny.gguf"))

    def scalar(key):
        f = r.get_field(key)
        assert f is not None, key
        return f.contents()

    assert scalar("general.architecture") == "granite"
    for hf_key, (method, key) in GGUF_KEYS.items():
        f = r.get_field(key)
        assert f.types == [gguf.GGUFValueType.FLOAT32], (key, f.types)
        v = scalar(key)
        print(f"gguf: {key} = {v!r} (f32 of {hf_key} {MULTIPLIERS[hf_key]}, written by GGUFWriter.{method})")
        assert v == float(np.float32(MULTIPLIERS[hf_key])), (key, v)
    assert scalar("granite.rope.dimension_count") == HEAD_DIM
    assert r.get_field("granite.attention.key_length") is None
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors
    sd = model.state_dict()
    cfg = model.config
    for gname, hname, heads in [("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", cfg.num_attention_heads),
                                ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", cfg.num_key_value_heads),
                                ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj.weight", None),
                                ("token_embd.weight", "model.embed_tokens.weight", None),
                                ("output_norm.weight", "model.norm.weight", None)]:
        want = sd[hname].numpy()
        if heads is not None:
            want = common.permute(want, heads)
        got = np.asarray(tensors[gname].data).astype(np.float32).reshape(want.shape)
        assert np.array_equal(got, want), gname
    print(f"gguf: {len(tensors)} tensors read back; q/k rows permuted")


def with_multipliers(cfg, model, **changes):
    """The same weights in a GraniteForCausalLM whose config has `changes`."""
    c = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(c, k, v)
    m = GraniteForCausalLM(c).float().eval()
    m.load_state_dict(model.state_dict())
    return m


def ablation_checks(cfg, model, ids):
    """Each multiplier must matter: that one set back to 1.0 (and attention_multiplier also to
    Llama's 1 / sqrt(head_dim)) moves the logits by more than 1e-3 of their largest magnitude.
    Also the reloaded hf/ gives the reference logits exactly."""
    ref = common.logits_of(model, ids)
    top = ref.abs().max().item()
    effects = {}
    runs = [(k, 1.0) for k in MULTIPLIERS] + [("attention_multiplier", 1.0 / math.sqrt(HEAD_DIM))]
    for k, v in runs:
        d = (common.logits_of(with_multipliers(cfg, model, **{k: v}), ids) - ref).abs().max().item()
        print(f"max |logit change| with {k} = {v} instead of {MULTIPLIERS[k]}: {d:.4f} "
              f"({d / top:.4f} of the logits' max |.| {top:.4f})")
        assert d > 1e-3 * top, (k, v, d, top)
        effects[f"{k}={v}"] = d / top
    # Nothing else differs: the unchanged multipliers give the reference bit for bit.
    assert torch.equal(common.logits_of(with_multipliers(cfg, model), ids), ref)
    back = GraniteForCausalLM.from_pretrained(os.path.join(OUT, "hf"), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    assert all(getattr(back.config, k) == v for k, v in MULTIPLIERS.items())
    d2 = (common.logits_of(back, ids) - ref).abs().max().item()
    print(f"max |logit difference| of hf/ reloaded by transformers: {d2}")
    assert d2 == 0.0, d2
    return effects


def folding_check(cfg, model, cases):
    """The plain Llama with the four scalars folded into its weights gives Granite's logits."""
    lcfg = LlamaConfig(**BASE, head_dim=HEAD_DIM, rope_parameters=dict(ROPE), attn_implementation="eager")
    llama = LlamaForCausalLM(lcfg).float().eval()
    assert llama.model.layers[0].self_attn.scaling == HEAD_DIM ** -0.5
    mu = MULTIPLIERS
    folds = {
        "q_proj.weight": mu["attention_multiplier"] * math.sqrt(HEAD_DIM),
        "o_proj.weight": mu["residual_multiplier"],
        "down_proj.weight": mu["residual_multiplier"],
        "embed_tokens.weight": mu["embedding_multiplier"],
        "model.norm.weight": 1.0 / (mu["embedding_multiplier"] * mu["logits_scaling"]),
    }
    src = model.state_dict()
    dst = llama.state_dict()
    assert set(src) == set(dst), set(src) ^ set(dst)
    folded = {}
    with torch.no_grad():
        for name, t in src.items():
            if name == "lm_head.weight":
                continue  # tied: the folded embedding
            f = [v for k, v in folds.items() if name.endswith(k)]
            assert len(f) <= 1, name
            folded[name] = t * f[0] if f else t.clone()
        folded["lm_head.weight"] = folded["model.embed_tokens.weight"]
        llama.load_state_dict(folded)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    print("folds:", folds)
    worst = 0.0
    for c in cases:
        ids = c["ids"]
        g = common.logits_of(model, ids)
        l = common.logits_of(llama, ids)
        top = g.abs().max().item()
        d = (l - g).abs().max().item()
        worst = max(worst, d / top)
        print(f"folding, {len(ids)} ids: max |Llama - Granite| {d:.3e} ({d / top:.3e} of the logits' max |.| {top:.4f})")
        if d > 1e-4 * top:
            stages(model, llama, ids)
            raise AssertionError(f"folding: {d} > 1e-4 * {top} on the {len(ids)}-id case")
    stages(model, llama, cases[1]["ids"])
    return worst


def stages(granite, llama, ids):
    """Where the folded Llama departs from Granite, stage by stage: the scaled embeddings
    (embed_tokens), each branch's output as added to the residual (self_attn, mlp) and the final
    norm's output as the tied head sees it (norm). Prints the largest relative difference of each
    kind; a wrong fold shows first at its own stage."""
    mu = MULTIPLIERS
    # What Granite multiplies each module's output by before using it: the Llama's folded output.
    scale = dict(embed_tokens=mu["embedding_multiplier"], self_attn=mu["residual_multiplier"],
                 mlp=mu["residual_multiplier"], norm=1.0 / (mu["embedding_multiplier"] * mu["logits_scaling"]))
    cap = {}

    def hooks(m, tag):
        hs = []
        for name, mod in m.model.named_modules():
            kind = name.split(".")[-1]
            if kind in scale and (kind != "norm" or name == "norm"):
                def h(_, __, out, name=name, kind=kind):
                    out = out[0] if isinstance(out, tuple) else out
                    cap[(tag, name)] = out.detach() * (scale[kind] if tag == "granite" else 1.0)
                hs.append(mod.register_forward_hook(h))
        return hs

    hs = hooks(granite, "granite") + hooks(llama, "llama")
    common.logits_of(granite, ids)
    common.logits_of(llama, ids)
    for h in hs:
        h.remove()
    worst = {}
    for (tag, name), g in cap.items():
        if tag != "granite":
            continue
        l = cap[("llama", name)]
        kind = name.split(".")[-1]
        worst[kind] = max(worst.get(kind, 0.0), ((l - g).abs().max() / g.abs().max()).item())
    print("folding stages, max relative |Llama - Granite| on", len(ids), "ids:",
          {k: f"{v:.1e}" for k, v in worst.items()})


def main():
    os.makedirs(OUT, exist_ok=True)
    versions = dict(torch=torch.__version__, transformers=__import__("transformers").__version__,
                    gguf=__import__("importlib.metadata").metadata.version("gguf"))
    cfg, model = tiny_model()
    common.write_hf(model, os.path.join(OUT, "hf"))
    print("gguf tensors:", write_gguf(cfg, model))
    check_gguf(model)
    cases = common.logits_reference(model)
    effects = ablation_checks(cfg, model, cases[1]["ids"])
    worst = folding_check(cfg, model, cases)
    print(f"folding: worst max |Llama - Granite| / max |logit| over the 3 cases: {worst:.3e}")
    ref = dict(rope=ROPE, multipliers=MULTIPLIERS, cases=cases, versions=versions)
    json.dump(ref, open(os.path.join(OUT, "logits.json"), "w"))
    tr = common.train_reference("granite", model, OUT)
    print("losses:", tr["losses"])
    tr["f32_update_dist"] = common.f32_update_distances("granite", model, OUT)
    json.dump(tr, open(os.path.join(OUT, "train.json"), "w"))
    print("multiplier effects (fraction of max |logit|):", effects)
    common.print_sizes(OUT)


if __name__ == "__main__":
    main()
