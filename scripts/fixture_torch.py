#!/usr/bin/env python3
"""Re-run the SmolLM2 WeGeFT fixture fine-tune (../shared/fixtures/smollm2/train.json) in plain
PyTorch, in several numerically different but mathematically equivalent ways, to measure how
far independent float32 runs drift apart at steps 4-5.

Model: a minimal Llama (SmolLM2-135M shapes) written to follow transformers' LlamaForCausalLM
op by op (f32 RMSNorm x*rsqrt(mean(x^2)+eps)*w, rotate_half RoPE, SDPA causal attention with
GQA, SwiGLU MLP, tied lm_head, mean CE over all next tokens of the batch). Base weights: an HF
safetensors directory (dequantized GGUF, HF q/k row order), e.g. from `wegeft merge` with the
fixture's init adapter (out_proj = 0, so merged = base).

Adapter: the official GIFT formulation, one (in_proj r x d_in, out_proj d_in x r) pair per
module type shared by all layers:
    dW = F.linear(F.linear(W, in_proj), out_proj)      # (W in^T) out^T
    y  = F.linear(x, W) + F.linear(x, dW)               # variant "merged": F.linear(x, W + dW)
AdamW(lr, betas 0.9/0.999, eps 1e-8, wd 0), batch 2 in file order.

Usage (docs/fixture-precision.md has the runs): scripts/fixture_torch.py --base DIR --fixtures DIR --variant NAME --threads N --out RESULT.json
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

H, KVH, HD, L, HID, FFN, VOCAB = 9, 3, 64, 30, 576, 1536, 49152
THETA, EPS = 100000.0, 1e-5
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def rmsnorm(x, w):
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + EPS))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(seq, dtype):
    # as transformers' LlamaRotaryEmbedding (default rope): float32 inv_freq, then cast
    inv_freq = 1.0 / (THETA ** (torch.arange(0, HD, 2, dtype=torch.int64).to(torch.float32) / HD))
    if dtype == torch.float64:
        inv_freq = 1.0 / (THETA ** (torch.arange(0, HD, 2, dtype=torch.float64) / HD))
    pos = torch.arange(seq, dtype=inv_freq.dtype)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Model:
    def __init__(self, base, adapter, targets, dtype, variant, attn, loss):
        self.w = {k: v.to(dtype) for k, v in base.items()}
        self.targets = targets
        self.variant = variant
        self.attn = attn
        self.loss_kind = loss
        # transformers upcasts logits (and eager softmax) to float32; never downcast float64
        self.ce_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.dtype = dtype
        self.ip = {m: adapter[f"in_projections.{m}.weight"].to(dtype).clone().requires_grad_(True) for m in targets}
        self.op = {m: adapter[f"out_projections.{m}.weight"].to(dtype).clone().requires_grad_(True) for m in targets}

    def params(self):
        # a fixed order: in then out, per module in train.json order
        return [self.ip[m] for m in self.targets] + [self.op[m] for m in self.targets]

    def lin(self, x, i, m):
        part = "self_attn" if m in ATTN else "mlp"
        W = self.w[f"model.layers.{i}.{part}.{m}.weight"]
        if m not in self.targets:
            return F.linear(x, W)
        dW = F.linear(F.linear(W, self.ip[m]), self.op[m])
        if self.variant == "merged":
            return F.linear(x, W + dW)
        y = F.linear(x, W)
        y = y + F.linear(x, dW)
        return y

    def forward(self, ids):
        B, S = ids.shape
        w = self.w
        x = F.embedding(ids, w["model.embed_tokens.weight"])
        cos, sin = rope_cos_sin(S, self.dtype)
        for i in range(L):
            p = f"model.layers.{i}."
            h = rmsnorm(x, w[p + "input_layernorm.weight"])
            q = self.lin(h, i, "q_proj").view(B, S, H, HD).transpose(1, 2)
            k = self.lin(h, i, "k_proj").view(B, S, KVH, HD).transpose(1, 2)
            v = self.lin(h, i, "v_proj").view(B, S, KVH, HD).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if self.attn != "gqa":  # transformers' repeat_kv
                k = k[:, :, None].expand(B, KVH, H // KVH, S, HD).reshape(B, H, S, HD)
                v = v[:, :, None].expand(B, KVH, H // KVH, S, HD).reshape(B, H, S, HD)
            if self.attn == "eager":
                att = (q @ k.transpose(2, 3)) * (HD ** -0.5)
                mask = torch.full((S, S), float("-inf"), dtype=att.dtype).triu(1)
                att = torch.softmax(att + mask, dim=-1, dtype=self.ce_dtype).to(q.dtype)
                o = att @ v
            elif self.attn in ("sdpa_boolmask", "sdpa_floatmask"):
                # sdpa with an explicit causal mask (what transformers does when it builds a mask)
                m = torch.ones(S, S, dtype=torch.bool).tril()
                if self.attn == "sdpa_floatmask":
                    m = torch.zeros(S, S, dtype=q.dtype).masked_fill(~m, torch.finfo(q.dtype).min)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=HD ** -0.5)
            else:
                # transformers 5 sdpa path: no mask -> is_causal, enable_gqa (use_gqa_in_sdpa)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=HD ** -0.5,
                                                   enable_gqa=self.attn == "gqa")
            o = o.transpose(1, 2).reshape(B, S, H * HD)
            x = x + self.lin(o, i, "o_proj")
            h = rmsnorm(x, w[p + "post_attention_layernorm.weight"])
            g = self.lin(h, i, "gate_proj")
            u = self.lin(h, i, "up_proj")
            x = x + self.lin(F.silu(g) * u, i, "down_proj")
        x = rmsnorm(x, w["model.norm.weight"])
        return F.linear(x, w["model.embed_tokens.weight"])

    def loss(self, ids):
        logits = self.forward(ids)
        if self.loss_kind == "slice":
            return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).to(self.ce_dtype), ids[:, 1:].reshape(-1))
        # transformers' ForCausalLMLoss: pad labels with -100, shift, mean over the kept tokens
        labels = F.pad(ids, (0, 1), value=-100)[..., 1:].contiguous()
        return F.cross_entropy(logits.to(self.ce_dtype).view(-1, VOCAB), labels.view(-1), ignore_index=-100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--variant", default="plain", choices=["plain", "merged"])
    ap.add_argument("--perturb", type=float, default=0.0, help="relative Gaussian perturbation of the init in_proj")
    ap.add_argument("--attn", default="gqa", choices=["gqa", "repeat", "eager", "sdpa_boolmask", "sdpa_floatmask"])
    ap.add_argument("--loss", default="hf", choices=["hf", "slice"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check-logits", action="store_true", help="also compare the base model to logits.json")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    fx = a.fixtures
    cfg = json.load(open(os.path.join(fx, "train.json")))
    data = [json.loads(l)["tokens"][: cfg["seq"]] for l in open(os.path.join(fx, "train.jsonl")) if l.strip()]
    base = load_file(os.path.join(a.base, "model.safetensors"))
    init = load_file(os.path.join(fx, "init_adapter.safetensors"))
    want = load_file(os.path.join(fx, "final_adapter.safetensors"))
    if a.perturb:
        g = torch.Generator().manual_seed(1234)
        for k in list(init):
            if k.startswith("in_projections"):
                init[k] = init[k] * (1 + a.perturb * torch.randn(init[k].shape, generator=g, dtype=torch.float64))
                if a.dtype == "float32":
                    init[k] = init[k].float()
    model = Model(base, init, cfg["targets"], dtype, a.variant, a.attn, a.loss)
    res = {"variant": a.variant, "perturb": a.perturb, "attn": a.attn, "loss": a.loss, "dtype": a.dtype, "threads": a.threads, "torch": torch.__version__}

    if a.check_logits:
        with torch.no_grad():
            rows = []
            for e in json.load(open(os.path.join(fx, "logits.json"))):
                ids = torch.tensor([e["ids"]])
                lg = model.forward(ids)[0]
                loss = F.cross_entropy(lg[:-1].float(), ids[0, 1:]).item()
                last = lg[-1].double()
                ref = torch.tensor(e["logits_last"], dtype=torch.float64)
                rows.append({"n": len(e["ids"]), "loss": loss, "want": e["loss"], "rel": abs(loss - e["loss"]) / e["loss"],
                             "max_abs_logit_diff": (last - ref).abs().max().item(),
                             "argmax_ok": lg.argmax(-1).tolist() == e["argmax"]})
            pr = json.load(open(os.path.join(fx, "prompt_reference.json")))
            ids = torch.tensor([pr["ids"]])
            lg = model.forward(ids)[0]
            loss = F.cross_entropy(lg[:-1].float(), ids[0, 1:]).item()
            top = torch.topk(lg[-1], 10)
            rows.append({"n": 5, "loss": loss, "want": pr["ce_loss_labels_eq_ids"],
                         "rel": abs(loss - pr["ce_loss_labels_eq_ids"]) / pr["ce_loss_labels_eq_ids"],
                         "max_abs_logit_diff": max(abs(v - pv) for v, (_, pv) in zip(top.values.tolist(), pr["top10_last"])),
                         "argmax_ok": lg.argmax(-1).tolist() == pr["argmax_per_pos"]
                         and top.indices.tolist() == [t for t, _ in pr["top10_last"]]})
            res["logits_check"] = rows

    opt = torch.optim.AdamW(model.params(), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    t0 = time.time()
    pos = 0
    grad_norms = []
    snaps = {}  # adapter after each step and the gradient of each step, for step-by-step comparisons
    for step in range(cfg["steps"]):
        batch = data[pos: pos + cfg["batch"]]
        pos += cfg["batch"]
        ids = torch.tensor(batch)
        opt.zero_grad(set_to_none=True)
        loss = model.loss(ids)
        loss.backward()
        losses.append(loss.item())
        grad_norms.append(math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in model.params())))
        for m in cfg["targets"]:
            snaps[f"grad{step}.in.{m}"] = model.ip[m].grad.detach().double().clone()
            snaps[f"grad{step}.out.{m}"] = model.op[m].grad.detach().double().clone()
        opt.step()
        for m in cfg["targets"]:
            snaps[f"step{step}.in.{m}"] = model.ip[m].detach().double().clone()
            snaps[f"step{step}.out.{m}"] = model.op[m].detach().double().clone()
    res["train_s"] = time.time() - t0
    res["losses"] = losses
    res["grad_norms"] = grad_norms
    res["losses_rel_fixture"] = [abs(l - w) / w for l, w in zip(losses, cfg["losses"])]

    final = {}
    for m in cfg["targets"]:
        final[f"in_projections.{m}.weight"] = model.ip[m].detach().to(torch.float32 if a.dtype == "float32" else torch.float64).contiguous()
        final[f"out_projections.{m}.weight"] = model.op[m].detach().to(torch.float32 if a.dtype == "float32" else torch.float64).contiguous()
    save_file(final, a.out.replace(".json", ".safetensors"))
    save_file(snaps, a.out.replace(".json", ".steps.safetensors"))
    init0 = load_file(os.path.join(fx, "init_adapter.safetensors"))
    res["adapter_dist_fixture"] = {
        k: math.sqrt(((final[k].double() - want[k].double()) ** 2).sum().item() / ((want[k].double() - init0[k].double()) ** 2).sum().item())
        for k in sorted(final)}

    with torch.no_grad():
        lg = model.forward(torch.tensor([cfg["probe_ids"]]))[0, -1]
        top = torch.topk(lg, 5)
        res["probe_top5"] = [[i, v] for i, v in zip(top.indices.tolist(), top.values.tolist())]
        res["probe_top5_ids_match"] = top.indices.tolist() == [t for t, _ in cfg["probe_logits_last_top5"]]
        res["probe_top5_max_abs_diff_at_fixture_ids"] = max(abs(lg[t].item() - v) for t, v in cfg["probe_logits_last_top5"])
    json.dump(res, open(a.out, "w"), indent=1)
    print(json.dumps({k: res[k] for k in ("variant", "perturb", "attn", "loss", "dtype", "threads", "losses", "losses_rel_fixture", "train_s")}))
    if "logits_check" in res:
        for r in res["logits_check"]:
            print(r)


if __name__ == "__main__":
    main()
