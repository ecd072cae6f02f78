#!/usr/bin/env python3
"""Writes the SmolLM3 reference data of the crate's SmolLM3 tests into tests/data/smollm3/, all
computed by implementations independent of this crate (transformers, PyTorch, gguf-py, Jinja2):

* hf/ — a tiny `SmolLM3ForCausalLM` of SmolLM3-3B's architecture: Llama's block (GQA, no biases,
  tied embeddings, plain RoPE with theta 5e6, rms_norm_eps 1e-6, use_sliding_window false), 8
  layers, with transformers' default `no_rope_layers` derived from `no_rope_layer_interval` 4:
  [1, 1, 1, 0, 1, 1, 1, 0], i.e. layers 3 and 7 apply no RoPE (NoPE) to q and k. Random weights
  (those of scripts/reference_common.py's tiny_model), stored as f16, saved by transformers
  (`save_pretrained`, safetensors). The script checks that applying RoPE in every layer instead
  changes the logits clearly, so the reference exercises the NoPE layers, and that the reloaded hf/
  gives the reference logits exactly.
* tiny.gguf — the same weights as llama.cpp's converter (convert_hf_to_gguf.py / conversion/llama.py,
  `class SmolLM3Model(LlamaModel)` with model_arch MODEL_ARCH.SMOLLM3) writes them with gguf-py's
  GGUFWriter: architecture "smollm3", the smollm3.* keys of TextModel.set_gguf_parameters plus
  LlamaModel's `vocab_size` and `rope.dimension_count` (no key_length/value_length: a SmolLM3 config
  has no head_dim; no key for the NoPE interval: llama.cpp hard-codes n_no_rope_layer_step = 4 for
  this architecture), q/k rows PERMUTED as LlamaModel.modify_tensors does (undo_permute), tensor
  names from gguf-py's own TensorNameMap, no `output.weight` (tied); f16 matrices, f32 norms. As
  for tests/data/llama3/tiny.gguf, the only tokenizer keys are tokenizer.ggml.bos_token_id /
  eos_token_id.
* logits.json — transformers' `SmolLM3ForCausalLM` (f32, eager attention) on those weights: for
  each id sequence, the mean next-token loss, the argmax per position and the full logits at a few
  positions (the layout of tests/data/qwen/qwen2/logits.json), plus the model's no_rope_layers.
* train_init.safetensors, train_final.safetensors, train.json — the WeGeFT fine-tune of
  scripts/llama3_reference.py and scripts/qwen_reference.py (scripts/reference_common.py's
  train_reference: one in_proj/out_proj pair per module type shared by all layers,
  `dW = (W in_proj^T) out_proj^T`, all seven projections, rank 4; float64 PyTorch autograd and
  `torch.optim.AdamW`, 4 steps, same seeds and data construction) on that model.
* chat/smollm3.jinja, chat/cases.json — the SmolLM3-3B chat template as llama.cpp vendors it
  (models/templates/HuggingFaceTB-SmolLM3-3B.jinja, here from the llama-cpp-python==0.3.36 sdist;
  its header says it carries edits by Unsloth "to make it work for most inference engines"),
  verbatim, and its renderings by transformers' `apply_chat_template(..., tokenize=False)` for a
  few conversations (the tokenizer only supplies the template's environment: this template uses no
  bos/eos token variable and no date). Pass the .jinja file with --chat-template; without it the
  script checks the committed chat/smollm3.jinja against SMOLLM3_TEMPLATE_SHA256 and re-renders it.

    python -m venv /tmp/pt && /tmp/pt/bin/pip install torch transformers tokenizers gguf jinja2
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp \\
        llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/HuggingFaceTB-SmolLM3-3B.jinja
    /tmp/pt/bin/python scripts/smollm3_reference.py --chat-template \\
        /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/HuggingFaceTB-SmolLM3-3B.jinja
"""
import argparse
import copy
import hashlib
import json
import os

import torch
import gguf
from transformers import SmolLM3Config, SmolLM3ForCausalLM

import reference_common as common

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "data", "smollm3")

CONFIG = dict(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    tie_word_embeddings=True,
    attention_bias=False,
    use_sliding_window=False,
    no_rope_layer_interval=4,
)
# SmolLM3-3B's rope_theta (transformers' SmolLM3Config.default_theta is 2e6).
ROPE = dict(rope_type="default", rope_theta=5e6)
NOPE_LAYERS = [3, 7]

SMOLLM3_TEMPLATE_SHA256 = "19eacf64569032f07644ea92c8e2a87af06ee7008147557302c31e474912ca97"
SMOLLM3_TEMPLATE_SOURCE = ("HuggingFaceTB/SmolLM3-3B chat template as vendored by llama.cpp: llama-cpp-python==0.3.36 "
                           "sdist, vendor/llama.cpp/models/templates/HuggingFaceTB-SmolLM3-3B.jinja (its header: "
                           "edits made by Unsloth to make it work for most inference engines)")


def tiny_model():
    cfg, model = common.tiny_model(SmolLM3Config, SmolLM3ForCausalLM, CONFIG, ROPE)
    assert cfg.no_rope_layers == [0 if l in NOPE_LAYERS else 1 for l in range(8)], cfg.no_rope_layers
    assert [l for l, layer in enumerate(model.model.layers) if not layer.self_attn.use_rope] == NOPE_LAYERS
    assert all(t == "full_attention" for t in cfg.layer_types), cfg.layer_types
    return cfg, model


def write_gguf(cfg, model):
    """conversion/llama.py's SmolLM3Model (a LlamaModel) with --outtype f16."""
    arch = gguf.MODEL_ARCH.SMOLLM3
    assert gguf.MODEL_ARCH_NAMES[arch] == "smollm3"
    # The saved config.json has no head_dim, so TextModel.set_gguf_parameters writes no
    # key_length / value_length.
    assert "head_dim" not in json.load(open(os.path.join(OUT, "hf", "config.json")))
    # LlamaModel.modify_tensors (undo_permute = True).
    return common.llama_model_gguf(os.path.join(OUT, "tiny.gguf"), arch, "tiny-smollm3-reference", cfg,
                                   ROPE["rope_theta"], model)


def ablation_checks(cfg, model, ids):
    """The NoPE layers must matter: the same weights with RoPE in every layer give clearly
    different logits. Also the reloaded hf/ gives the reference logits exactly."""
    ref = common.logits_of(model, ids)
    c = copy.deepcopy(cfg)
    c.no_rope_layers = [1] * cfg.num_hidden_layers
    m = SmolLM3ForCausalLM(c).float().eval()
    m.load_state_dict(model.state_dict())
    assert all(layer.self_attn.use_rope for layer in m.model.layers)
    d = (common.logits_of(m, ids) - ref).abs().max().item()
    print(f"max |logit change| with RoPE in every layer: {d:.3f} (logits max |.| {ref.abs().max().item():.3f})")
    assert d > 0.5, d
    back = SmolLM3ForCausalLM.from_pretrained(os.path.join(OUT, "hf"), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    assert back.config.no_rope_layers == cfg.no_rope_layers, back.config.no_rope_layers
    d2 = (common.logits_of(back, ids) - ref).abs().max().item()
    print(f"max |logit difference| of hf/ reloaded by transformers: {d2}")
    assert d2 == 0.0, d2
    return d


CHATS = [
    [dict(role="user", content="What is 345 + 678?")],
    [dict(role="system", content="You are terse."), dict(role="user", content="  Hi!\n")],
    [dict(role="user", content="Hi!"), dict(role="assistant", content="\nHello."),
     dict(role="user", content="Count: 1 2 3")],
    [dict(role="user", content="Hi!"), dict(role="assistant", content="Hello.")],
]


def chat_reference(template_path):
    from transformers import PreTrainedTokenizerFast
    d = os.path.join(OUT, "chat")
    os.makedirs(d, exist_ok=True)
    fname = "smollm3.jinja"
    src = template_path or os.path.join(d, fname)
    text = open(src, "rb").read()
    assert hashlib.sha256(text).hexdigest() == SMOLLM3_TEMPLATE_SHA256, src
    if template_path:
        with open(os.path.join(d, fname), "wb") as f:
            f.write(text)
    text = text.decode("utf-8")
    tok_path = os.path.join(ROOT, "tests", "data", "qwen", "tokenizer", "tokenizer.json")
    tok = PreTrainedTokenizerFast(tokenizer_file=tok_path, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = text
    cases = []
    runs = [(0, True, {}), (1, True, {}), (2, True, {}), (3, False, {}),
            # The template's other mode (reasoning "/no_think").
            (0, True, dict(enable_thinking=False)), (2, True, dict(enable_thinking=False)),
            (3, False, dict(enable_thinking=False))]
    for i, gen, kw in runs:
        out = tok.apply_chat_template(CHATS[i], add_generation_prompt=gen, tokenize=False, **kw)
        cases.append(dict(messages=CHATS[i], add_generation_prompt=gen, kwargs=kw, text=out))
        print(i, gen, kw, repr(out)[:100], "...", repr(out)[-80:])
    json.dump(dict(template=dict(file=fname, sha256=SMOLLM3_TEMPLATE_SHA256, source=SMOLLM3_TEMPLATE_SOURCE),
                   cases=cases),
              open(os.path.join(d, "cases.json"), "w"), ensure_ascii=False, indent=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chat-template", help="llama.cpp's models/templates/HuggingFaceTB-SmolLM3-3B.jinja")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    versions = dict(torch=torch.__version__, transformers=__import__("transformers").__version__)
    cfg, model = tiny_model()
    common.write_hf(model, os.path.join(OUT, "hf"))
    print("gguf tensors:", write_gguf(cfg, model))
    cases = common.logits_reference(model)
    ablation_checks(cfg, model, cases[1]["ids"])
    ref = dict(rope=ROPE, no_rope_layers=cfg.no_rope_layers, cases=cases, versions=versions)
    json.dump(ref, open(os.path.join(OUT, "logits.json"), "w"))
    tr = common.train_reference("smollm3", model, OUT)
    print("losses:", tr["losses"])
    json.dump(tr, open(os.path.join(OUT, "train.json"), "w"))
    chat_reference(a.chat_template)
    common.print_sizes(OUT)


if __name__ == "__main__":
    main()
