"""What scripts/llama3_reference.py, scripts/qwen_reference.py and scripts/smollm3_reference.py
share: the tiny models' random f16-valued weights and their hf/ save, the logits reference, the
float64 WeGeFT fine-tune, and the GGUF keys and tensors that llama.cpp's converter writes for all
of these models. Importing it writes nothing;
each script's docstring says what it writes and how to run it."""
import copy
import math
import os

import numpy as np
import torch
import gguf
from gguf import GGUFWriter, LlamaFileType, get_tensor_name_map


def tiny_model(config_cls, model_cls, config, rope):
    """A tiny `model_cls(config_cls(**config))` (f32, eager attention, the given rope parameters)
    with random weights from seed 1234: norms 1 + 0.1 N(0, 1), Qwen3's per-head q/k norms
    1 + 0.5 N(0, 1) (clearly away from 1), biases 0.5 N(0, 1) (large enough to matter), embeddings
    0.5 N(0, 1), matrices N(0, 1 / d_in)."""
    torch.manual_seed(1234)
    cfg = config_cls(**config, rope_parameters=dict(rope), attn_implementation="eager")
    model = model_cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "q_norm" in name or "k_norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
            # What the files hold: every value is an f16 value (hf/ stores all of them as f16, the
            # GGUF stores norms and biases as f32), so that every implementation sees the same.
            p.copy_(p.half().float())
    return cfg, model


def write_hf(model, d):
    """The model's weights as f16, saved by transformers (`save_pretrained`, safetensors) into d."""
    os.makedirs(d, exist_ok=True)
    # A copy: model.half() would also round the RoPE inv_freq buffers of `model` to f16 (and
    # model.float() would not restore them), so every reference computed after this (logits,
    # fine-tune) would use f16-rounded frequencies instead of transformers' exact f32 ones.
    copy.deepcopy(model).half().save_pretrained(d, safe_serialization=True)


def gguf_writer(path, arch, name, cfg, rope_theta, head_dim=None):
    """A GGUFWriter for `path` holding the keys of llama.cpp's TextModel.set_gguf_parameters that
    every model here has, and attention.key_length / value_length where a head_dim is given (the
    converter writes them when the config has one). Finish it with gguf_finish."""
    w = GGUFWriter(path, arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    return w


def permute(w, n_head):
    """llama.cpp's converter (LlamaModel.permute): rows reordered for interleaved RoPE."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_add_tensors(w, model, arch, cfg, permute_qk):
    """Adds every tensor of `model` to `w` as convert_hf_to_gguf.py with --outtype f16 names and
    stores them (the tied lm_head left out): q/k rows permuted when `permute_qk` (LlamaModel's
    modify_tensors, undo_permute), 1-d tensors and *_norm.weight in f32, the rest in f16.
    Returns the GGUF names in order."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tmap = get_tensor_name_map(arch, cfg.num_hidden_layers)
    names = []
    for hf_name, t in sd.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # not in the safetensors the converter reads
        if permute_qk and hf_name.endswith("q_proj.weight"):
            t = permute(t, cfg.num_attention_heads)
        elif permute_qk and hf_name.endswith("k_proj.weight"):
            t = permute(t, cfg.num_key_value_heads)
        new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert new is not None, hf_name
        # ModelBase.prepare_tensors for LlamaFileType.MOSTLY_F16: 1-d tensors and *_norm.weight f32.
        if t.ndim <= 1 or new.endswith("_norm.weight"):
            t = t.astype(np.float32)
        else:
            t = t.astype(np.float16)
        w.add_tensor(new, t)
        names.append(new)
    return names


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def llama_model_gguf(path, arch, name, cfg, rope_theta, model, extra_keys=lambda w: None):
    """The GGUF llama.cpp's converter writes for a model it converts as a LlamaModel (SmolLM3,
    Granite: q/k rows permuted, `undo_permute = True`), --outtype f16, when config.json has no
    head_dim (so TextModel.set_gguf_parameters writes no key_length / value_length): gguf_writer's
    keys, then LlamaModel.set_gguf_parameters' vocab_size and rope.dimension_count, then
    whatever `extra_keys(w)` adds (the subclass's own set_gguf_parameters), the tensors and
    gguf_finish's keys. Returns the GGUF tensor names in order."""
    w = gguf_writer(path, gguf.MODEL_ARCH_NAMES[arch], name, cfg, rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    extra_keys(w)
    names = gguf_add_tensors(w, model, arch, cfg, permute_qk=True)
    gguf_finish(w, cfg)
    return names


def gguf_finish(w, cfg):
    """The last keys, after whatever gguf_writer's caller added (the writer keeps the keys in the
    order they are added, tensors apart): file type mostly f16 and, as the only tokenizer keys (no
    vocabulary), the special ids the converter takes from config.json. Then writes the file."""
    w.add_file_type(LlamaFileType.MOSTLY_F16)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def logits_reference(model):
    """For 3 random id sequences (5, 48 and 300 ids): the mean next-token loss, the argmax per
    position and the full logits at the first, middle and last positions."""
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 48, 300)]
    cases = []
    for ids in seqs:
        with torch.no_grad():
            out = model(torch.tensor([ids]), labels=torch.tensor([ids]))
        lg = out.logits[0].float()
        pos = sorted({0, len(ids) // 2, len(ids) - 1})
        cases.append(dict(ids=ids, loss=float(out.loss), argmax=lg.argmax(-1).tolist(),
                          positions=pos, logits=[lg[p].tolist() for p in pos]))
    return cases


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
    assert logits.dtype in (torch.float64, torch.float32), logits.dtype
    v = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    if check:
        with torch.no_grad():
            hf = m.loss_function(logits=logits.detach(), labels=ids, vocab_size=m.config.vocab_size)
        print(f"loss: ours (float64) {loss.item()!r}, transformers' ({hf.dtype}) {hf.item()!r}")
        assert abs(hf.item() - loss.item()) <= 1e-6 * loss.item(), (hf.item(), loss.item())
    return loss


def train_reference(label, model, out, dtype=torch.float64, recipe=None):
    """The WeGeFT fine-tune (TRAIN) with the official GIFT wrapper's math in float64: every
    targeted nn.Linear computes F.linear(x, W + (W in_proj^T) out_proj^T, b) with the pair of its
    module type, b the Linear's own (frozen) bias, None where it has none (all of Llama's).
    Writes train_init.safetensors (the initial adapter, f32 values) and train_final.safetensors
    (the final adapter, f64) into `out`; returns train.json's content (TRAIN, the batches, the
    loss before each update). With `dtype` float32 and `out` None: the same run in float32,
    nothing written, the final adapter returned under "final" (see f32_update_distances).

    With a `recipe` (a dict: steps, lr, schedule, warmup_steps, max_grad_norm or None,
    grad_accum), the training setup of transformers' Trainer instead: `grad_accum` batches per
    update, each batch's mean loss divided by grad_accum before its backward (the batches are
    the same size, so the gradient is that of the mean over all their tokens); then
    `torch.nn.utils.clip_grad_norm_` (with max_grad_norm; its returned norm is recorded either
    way); then AdamW; then the scheduler `transformers.get_scheduler(schedule, ...)` steps.
    `batches` then lists every batch in order (grad_accum per update), `losses` the mean loss of
    each update's batches, and train.json also holds the recipe, `lrs` (the learning rate of
    each update) and `grad_norms` (before clipping)."""
    import torch.nn.functional as F
    from safetensors.torch import save_file
    vocab = model.config.vocab_size
    m = copy.deepcopy(model).to(dtype)
    for p in m.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(99)
    r = TRAIN["rank"]
    ip, op = {}, {}
    for t in TRAIN["targets"]:
        lin = next(mod for n, mod in m.named_modules() if n.endswith(t))
        d_in = lin.in_features
        # Both nonzero (the official out_proj starts at zero) so that both get a gradient at once.
        ip[t] = (torch.randn(r, d_in, generator=g) / math.sqrt(d_in)).float().to(dtype).requires_grad_(True)
        op[t] = (0.1 * torch.randn(d_in, r, generator=g)).float().to(dtype).requires_grad_(True)
    probe = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = m(probe).logits
    wrapped = []
    for n, mod in m.named_modules():
        for t in TRAIN["targets"]:
            if n.endswith("." + t):
                def fwd(x, mod=mod, t=t):
                    w = mod.weight
                    return F.linear(x, w + (w @ ip[t].T) @ op[t].T, mod.bias)
                mod.forward = fwd
                wrapped.append((n, mod.bias is not None))
    assert len(wrapped) == len(TRAIN["targets"]) * model.config.num_hidden_layers, wrapped
    print(f"{label}: wrapped {len(wrapped)} Linears, with bias:", [n for n, b in wrapped if b])
    # With out_proj = 0 the wrapped model is the base model (its biases included).
    saved = {t: op[t].detach().clone() for t in TRAIN["targets"]}
    with torch.no_grad():
        for t in TRAIN["targets"]:
            op[t].zero_()
        assert torch.equal(m(probe).logits, base)
        for t in TRAIN["targets"]:
            op[t].copy_(saved[t])
    init = {}
    for t in TRAIN["targets"]:
        init[f"in_projections.{t}.weight"] = ip[t].detach().float().contiguous()
        init[f"out_projections.{t}.weight"] = op[t].detach().float().contiguous()
    if out is not None:
        save_file(init, os.path.join(out, "train_init.safetensors"))
    params = [x for t in TRAIN["targets"] for x in (ip[t], op[t])]
    lr = TRAIN["lr"] if recipe is None else recipe["lr"]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = None
    if recipe is not None:
        from transformers import get_scheduler
        sched = get_scheduler(recipe["schedule"], opt, num_warmup_steps=recipe["warmup_steps"],
                              num_training_steps=recipe["steps"])
    gb = torch.Generator().manual_seed(5)
    batches, losses, lrs, norms = [], [], [], []
    for k in range(TRAIN["steps"] if recipe is None else recipe["steps"]):
        opt.zero_grad()
        if recipe is None:
            ids = torch.randint(0, vocab, (TRAIN["batch"], TRAIN["seq"]), generator=gb)
            batches.append(ids.tolist())
            loss = causal_lm_loss(m, ids, check=k == 0 and dtype == torch.float64)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            continue
        total = 0.0
        for _ in range(recipe["grad_accum"]):
            ids = torch.randint(0, vocab, (TRAIN["batch"], TRAIN["seq"]), generator=gb)
            batches.append(ids.tolist())
            loss = causal_lm_loss(m, ids)
            (loss / recipe["grad_accum"]).backward()
            total += loss.item()
        losses.append(total / recipe["grad_accum"])
        max_norm = recipe["max_grad_norm"] if recipe["max_grad_norm"] is not None else math.inf
        norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm).item())
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    final = {}
    for t in TRAIN["targets"]:
        final[f"in_projections.{t}.weight"] = ip[t].detach().contiguous()
        final[f"out_projections.{t}.weight"] = op[t].detach().contiguous()
    if out is None:
        return dict(TRAIN, batches=batches, losses=losses, final=final)
    save_file(final, os.path.join(out, "train_final.safetensors"))
    if recipe is not None:
        return dict(TRAIN, **recipe, recipe=recipe, batches=batches, losses=losses, lrs=lrs, grad_norms=norms)
    return dict(TRAIN, batches=batches, losses=losses)


def f32_update_distances(label, model, out):
    """How far PyTorch's own float32 run of train_reference lands from the float64 one written
    in `out`: per target, |update_f32 - update_f64| / |update_f64| over both matrices (the
    measure tests/common/reference.rs uses). Where the fine-tune is ill-conditioned (a flat
    attention, say) float32 itself misses by more than usual; the tests scale their tolerance
    by this."""
    from safetensors.torch import load_file
    final32 = train_reference(f"{label}-f32", model, None, dtype=torch.float32)["final"]
    final = load_file(os.path.join(out, "train_final.safetensors"))
    init = load_file(os.path.join(out, "train_init.safetensors"))
    dist = {}
    for t in TRAIN["targets"]:
        num = den = 0.0
        for kind in ("in_projections", "out_projections"):
            k = f"{kind}.{t}.weight"
            g, w, i = final32[k].double(), final[k].double(), init[k].double()
            num += ((g - w) ** 2).sum().item()
            den += ((w - i) ** 2).sum().item()
        dist[t] = math.sqrt(num / den)
    print(f"{label}: PyTorch float32 vs float64 updates:", {t: f"{d:.1e}" for t, d in dist.items()})
    return dist


def print_sizes(out):
    """Prints every file under `out` with its size, then the total."""
    total = 0
    for dirpath, _, files in sorted(os.walk(out)):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            total += os.path.getsize(p)
            print(os.path.relpath(p, out), os.path.getsize(p))
    print("total", total)
