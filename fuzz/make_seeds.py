#!/usr/bin/env python3
"""Writes the small seed corpora of the fuzz targets into fuzz/seeds/<target>/ (committed).
Standard library only: GGUF v3 and safetensors are written by hand, as their specs say.
A tiny Llama (vocab 12, hidden 8, ffn 12, 2 layers, 2 heads, 1 kv head, head_dim 4)."""
import json, os, struct

HERE = os.path.dirname(os.path.abspath(__file__))
V, H, I, L, NH, NKV, HD = 12, 8, 12, 2, 2, 1, 4
TOKENS = ["<|im_end|>", "a", "b", "ab", "\u0120", "1", "2", "H", "e", "l", "o", "\u0120\u0120"]

def out(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

# ---- GGUF
T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)

def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b

def gval(t, v):
    if t == T_U32: return struct.pack("<I", v)
    if t == T_I32: return struct.pack("<i", v)
    if t == T_F32: return struct.pack("<f", v)
    if t == T_BOOL: return struct.pack("<B", v)
    if t == T_STR: return gstr(v)
    if t == T_ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(gval(et, x) for x in items)
    raise ValueError(t)

def gguf(kvs, tensors, align=32):
    b = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for k, t, v in kvs:
        b += gstr(k) + struct.pack("<I", t) + gval(t, v)
    off, offs = 0, []
    for name, ne, data in tensors:
        b += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        b += struct.pack("<IQ", 0, off)  # type F32
        offs.append(off)
        off = (off + len(data) + align - 1) // align * align
    b += b"\0" * ((-len(b)) % align)
    start = len(b)
    for (_, _, data), o in zip(tensors, offs):
        b += b"\0" * (start + o - len(b)) + data
    return b

def f32s(n, k):
    return struct.pack(f"<{n}f", *[((k * 31 + i) % 17 - 8) * 0.01 for i in range(n)])

def tok_kvs():
    return [
        ("tokenizer.ggml.model", T_STR, "gpt2"),
        ("tokenizer.ggml.pre", T_STR, "smollm"),
        ("tokenizer.ggml.tokens", T_ARR, (T_STR, TOKENS)),
        ("tokenizer.ggml.merges", T_ARR, (T_STR, ["a b", "\u0120 \u0120"])),
        ("tokenizer.ggml.token_type", T_ARR, (T_I32, [3] + [1] * (len(TOKENS) - 1))),
        ("tokenizer.ggml.eos_token_id", T_U32, 0),
        ("tokenizer.ggml.add_bos_token", T_BOOL, 0),
    ]

def llama_tensors(hd=HD, extra=lambda l: []):
    """The tiny Llama's tensors with heads of `hd`; `extra(l)` adds (name, shape) pairs after
    layer l's nine."""
    t = [("token_embd.weight", [H, V])]
    for l in range(L):
        for n, ne in [("attn_q", [H, NH * hd]), ("attn_k", [H, NKV * hd]), ("attn_v", [H, NKV * hd]),
                      ("attn_output", [NH * hd, H]), ("ffn_gate", [H, I]), ("ffn_up", [H, I]),
                      ("ffn_down", [I, H]), ("attn_norm", [H]), ("ffn_norm", [H])]:
            t.append((f"blk.{l}.{n}.weight", ne))
        t += extra(l)
    t.append(("output_norm.weight", [H]))
    return [(n, ne, f32s(ne[0] * (ne[1] if len(ne) > 1 else 1), k)) for k, (n, ne) in enumerate(t)]

llama_kvs = [
    ("general.architecture", T_STR, "llama"),
    ("llama.block_count", T_U32, L),
    ("llama.context_length", T_U32, 32),
    ("llama.embedding_length", T_U32, H),
    ("llama.feed_forward_length", T_U32, I),
    ("llama.attention.head_count", T_U32, NH),
    ("llama.attention.head_count_kv", T_U32, NKV),
    ("llama.rope.freq_base", T_F32, 10000.0),
    ("llama.attention.layer_norm_rms_epsilon", T_F32, 1e-6),
    ("llama.vocab_size", T_U32, V),
]
out("gguf", "tiny_llama.gguf", gguf(llama_kvs + tok_kvs(), llama_tensors()))

# Qwen2 (q/k/v biases) and Qwen3 (q/k head norms, heads of 6: q is 8 -> 12), with the qwen2
# pre-tokenizer.
def qwen_seed(arch, hd):
    kvs = [(k.replace("llama", arch, 1), t, v) for k, t, v in llama_kvs if k != "llama.vocab_size"]
    kvs = [(k, t, arch if k == "general.architecture" else v) for k, t, v in kvs]
    if arch == "qwen3":
        kvs += [("qwen3.attention.key_length", T_U32, hd), ("qwen3.attention.value_length", T_U32, hd)]
    toks = [(k, t, "qwen2" if k == "tokenizer.ggml.pre" else v) for k, t, v in tok_kvs()]
    if arch == "qwen2":
        extra = lambda l: [(f"blk.{l}.attn_q.bias", [NH * hd]), (f"blk.{l}.attn_k.bias", [NKV * hd]),
                           (f"blk.{l}.attn_v.bias", [NKV * hd])]
    else:
        extra = lambda l: [(f"blk.{l}.attn_q_norm.weight", [hd]), (f"blk.{l}.attn_k_norm.weight", [hd])]
    return gguf(kvs + toks, llama_tensors(hd, extra))

# SmolLM3: a Llama under another name (q/k permuted; every 4th layer without RoPE).
out("gguf", "tiny_smollm3.gguf", gguf([(k.replace("llama", "smollm3", 1), t, "smollm3" if k == "general.architecture" else v)
                                       for k, t, v in llama_kvs] + tok_kvs(), llama_tensors()))
# Granite: a Llama under another name with its four scalars.
granite_kvs = [(k.replace("llama", "granite", 1), t, "granite" if k == "general.architecture" else v) for k, t, v in llama_kvs]
granite_kvs += [("granite.attention.scale", T_F32, 0.09), ("granite.embedding_scale", T_F32, 12.0),
                ("granite.residual_scale", T_F32, 0.22), ("granite.logit_scale", T_F32, 6.0)]
out("gguf", "tiny_granite.gguf", gguf(granite_kvs + tok_kvs(), llama_tensors()))
out("gguf", "tiny_qwen2.gguf", qwen_seed("qwen2", HD))
out("gguf", "tiny_qwen3.gguf", qwen_seed("qwen3", 6))
out("gguf", "tokenizer_only.gguf", gguf(tok_kvs(), []))
out("gguf", "one_tensor.gguf", gguf([("general.alignment", T_U32, 64)], [("x", [4, 2], f32s(8, 1))], 64))
out("gguf", "header_only.gguf", gguf([], []))

# ---- tokenizer (structure-aware via `arbitrary`: any bytes are an input)
out("tokenizer", "zeros", bytes(64))
out("tokenizer", "ascii", b"gpt2\x01abHello world 12\x00\x01\x02\x03" * 4)
out("tokenizer", "ones", bytes([1]) * 128)

# ---- safetensors
def safetensors(tensors, meta=None):
    header, off, data = {}, 0, b""
    if meta:
        header["__metadata__"] = meta
    for name, shape, buf in tensors:
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(buf)]}
        off += len(buf)
        data += buf
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data

def split(a, b):
    return struct.pack("<H", len(a)) + a + b

R = 2
mods = [("q_proj", H), ("v_proj", H), ("down_proj", I)]
gift_t = []
for m, d_in in mods:
    gift_t.append((f"in_projections.{m}.weight", [R, d_in], f32s(R * d_in, 1)))
    gift_t.append((f"out_projections.{m}.weight", [d_in, R], f32s(R * d_in, 2)))
gift_st = safetensors(gift_t, {"format": "pt"})
gift_json = json.dumps({"rank": R, "target_modules": [m for m, _ in mods], "share_projections": False,
                        "in_projection_bias": False, "out_projection_bias": False, "alpha": None,
                        "dropout": 0.0, "seed": 0, "init": "gift"}).encode()
out("adapter", "gift_with_json", b"\x00" + split(gift_json, gift_st))
out("adapter", "gift_no_json", b"\x02" + split(b"", gift_st))
shared_st = safetensors([("in_projections.shared_projection.weight", [R, H], f32s(R * H, 3)),
                         ("out_projections.shared_projection.weight", [H, R], f32s(R * H, 4))])
shared_json = json.dumps({"rank": R, "target_modules": ["q_proj", "k_proj"], "share_projections": True,
                          "in_projection_bias": False, "out_projection_bias": False, "alpha": 4.0,
                          "dropout": 0.1, "seed": 3, "init": "peft"}).encode()
out("adapter", "gift_shared", b"\x00" + split(shared_json, shared_st))
peft_t = []
for m, parent, d_in in [("q_proj", "self_attn", H), ("v_proj", "self_attn", H)]:
    peft_t.append((f"base_model.model.model.layers.0.{parent}.{m}.wegeft_phi.weight", [R, d_in], f32s(R * d_in, 5)))
    peft_t.append((f"base_model.model.model.layers.0.{parent}.{m}.wegeft_psi.weight", [R, d_in], f32s(R * d_in, 6)))
peft_cfg = json.dumps({"peft_type": "WEGEFT", "r": R, "wegeft_alpha": 8, "transform_dim": "input",
                       "target_modules": ["q_proj", "v_proj"],
                       "tied_modules": [[".*\\.q_proj$"], [".*\\.v_proj$"]], "wegeft_dropout": None,
                       "bias": "none", "rank_pattern": {}, "alpha_pattern": {}}).encode()
out("adapter", "peft", b"\x01" + split(peft_cfg, safetensors(peft_t)))

# ---- HF checkpoint directory
hf_cfg = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": V,
                     "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 1,
                     "num_attention_heads": NH, "num_key_value_heads": NKV, "rms_norm_eps": 1e-6,
                     "rope_theta": 10000.0, "max_position_embeddings": 32,
                     "tie_word_embeddings": True}).encode()
hf_t = [("model.embed_tokens.weight", [V, H])]
for f, s in [("self_attn.q_proj", [NH * HD, H]), ("self_attn.k_proj", [NKV * HD, H]),
             ("self_attn.v_proj", [NKV * HD, H]), ("self_attn.o_proj", [H, NH * HD]),
             ("mlp.gate_proj", [I, H]), ("mlp.up_proj", [I, H]), ("mlp.down_proj", [H, I]),
             ("input_layernorm", [H]), ("post_attention_layernorm", [H])]:
    hf_t.append((f"model.layers.0.{f}.weight", s))
hf_t.append(("model.norm.weight", [H]))
hf_st = safetensors([(n, s, f32s(s[0] * (s[1] if len(s) > 1 else 1), k)) for k, (n, s) in enumerate(hf_t)],
                    {"format": "pt"})
out("safetensors", "tiny_llama", split(hf_cfg, hf_st))
out("safetensors", "config_only", split(hf_cfg, b""))

# ---- JSONL (first byte: seq in bits 0-5, tokenizer in bit 6)
out("jsonl", "tokens", bytes([0x10]) + b'{"tokens":[1,2,3,4]}\n\n{"tokens":[5,6]}\n')
out("jsonl", "text", bytes([0x48]) + b'{"text":"hello world"}\n{"prompt":"2+2=","completion":"4"}\n')
out("jsonl", "mixed", bytes([0x45]) + b'{"tokens":[1,2]}\r\n{"prompt":"q","completion":"\\u00e9\\n"}\n')
