"""PyTorch's scaled_dot_product_attention on the shapes of benches/attention_cuda.rs (bf16,
causal, GQA: B=16, H=9, KVH=3, hd=64, S=512 and 2048): forward, and forward + backward minus
forward as the backward. Same timing rule: 3 warm-up runs, median of --iters, L2 evicted by a
256 MiB memset before each run (outside the events). Run by the GPU runner (attn_torch step)."""
import argparse

import torch
import torch.nn.functional as F


def median_ms(fn, iters, flush):
    for _ in range(3):
        fn()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(iters):
        flush.zero_()
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    a = ap.parse_args()
    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    B, H, KVH, hd = 16, 9, 3, 64
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16; median of {a.iters}")
    for S in (512, 2048):
        q = torch.randn(B, H, S, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, KVH, S, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, KVH, S, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(B, H, S, hd, device=dev, dtype=torch.bfloat16)

        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def fwd_bwd():
            # No .grad left from the previous rep (None: no kernel, no sync), so the backward
            # writes dq, dk, dv instead of adding them to the old ones (an extra add kernel).
            q.grad = k.grad = v.grad = None
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            o.backward(g)

        f = median_ms(fwd, a.iters, flush)
        fb = median_ms(fwd_bwd, a.iters, flush)
        flops = 2.0 * B * H * S * S * hd
        b = max(fb - f, 1e-9)
        print(f"sdpa B={B} S={S} H={H} KVH={KVH} hd={hd}: forward {f:.3f} ms ({flops / f / 1e9:.1f} TFLOP/s), "
              f"backward {b:.3f} ms ({2.5 * flops / b / 1e9:.1f} TFLOP/s)")
        print(f'{{"op":"sdpa","seq":{S},"fwd_ms":{f:.4f},"bwd_ms":{b:.4f}}}')


if __name__ == "__main__":
    main()
