#!/usr/bin/env python3
"""The summary of a GPU check run (gpu-pack/run.sh), as markdown to paste into BENCHMARKS.md.

Reads the runner's logs folder: steps.tsv (name, status, seconds), NAME.log per step,
bench.jsonl (benches/layer_cuda.rs), torch.jsonl (torch_baseline.py), gemm_bench.log
(kernels/test/gemm_kext_check --bench). Standard library only; whatever is missing is shown
as missing, never guessed.
"""
import argparse
import json
import math
import os
import re
import sys


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def jsonl(path):
    rows = []
    for line in read(path).splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def num(v):
    """`v` as a float when it is a number (NaN included), else None (missing, null, text)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def fmt(v, spec=".3f", suffix=""):
    """A number for the tables: "—" when missing or not a number, "NaN" / "inf" as such."""
    x = num(v)
    if x is None:
        return "—"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:{spec}}{suffix}"


def div(a, b):
    """a / b when both are finite numbers and b is not zero, else None."""
    a, b = num(a), num(b)
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


def fmt_ms(ms, r=None):
    if num(ms) is None:
        return "—"
    s = fmt(ms)
    if num(r) is not None:
        s += f" ({fmt(r, '.2f')}x)"
    return s


def launch_cell(r):
    """Kernel launches + cuBLASLt calls per step and the step time per launch (our rows only):
    a few µs per launch would mean the host's launch overhead bounds the step (graphs pay)."""
    n, us = num(r.get("launches_per_step")), num(r.get("us_per_launch"))
    if n is None:
        return "—"
    return f"{n:.0f} ({fmt(us, '.1f')})"


def test_counts(text):
    p = f = 0
    found = False
    for m in re.finditer(r"test result: \w+\. (\d+) passed; (\d+) failed", text):
        found = True
        p += int(m.group(1))
        f += int(m.group(2))
    if not found:
        return None
    s = f"{p} passed, {f} failed"
    skipped = text.count("skipped: no CUDA device")
    if skipped:
        s += f", {skipped} skipped (no device)"
    return s


def first_error(text):
    """One line saying why a step failed: a panic's message, else the last error-looking line,
    else the last line."""
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("$ ")]
    for i, l in enumerate(lines):
        if "panicked at" in l and i + 1 < len(lines):
            return lines[i + 1]
    # A binary that could not start (a library missing on the GPU machine) says so once.
    for l in lines:
        if "error while loading shared libraries" in l or "cannot open shared object" in l:
            return l
    pat = re.compile(r"error|Error|ERROR|FAIL|failed|No module|insufficient|not found|Killed|Abort")
    for l in reversed(lines):
        if pat.search(l) and not l.startswith("test result") and not l.startswith("failures"):
            return l
    return lines[-1] if lines else "(empty log)"


def cell(s):
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= 160 else s[:157] + "..."


# The compute-sanitizer steps of gpu-runner.sh (and any later one named *memcheck / *racecheck /
# *initcheck / *synccheck).
SANITIZER_STEPS = ("gemm_memcheck", "memcheck", "racecheck", "initcheck", "model_memcheck", "multi_memcheck",
                   "attn_memcheck", "attn_racecheck")


def is_sanitizer_step(name):
    return name in SANITIZER_STEPS or re.search(r"(memcheck|racecheck|initcheck|synccheck)$", name) is not None


def sanitizer_key(text):
    m = re.search(r"ERROR SUMMARY: (\d+) errors?", text)
    parts = []
    if m:
        parts.append(f"{m.group(1)} sanitizer errors")
    m = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    if m:
        parts.append(f"racecheck: {m.group(2)} errors, {m.group(3)} warnings")
    t = test_counts(text)
    if t:
        parts.append(t)
    if "ALL OK" in text:
        parts.append("ALL OK")
    if "SOME FAILED" in text:
        parts.append("SOME FAILED")
    return "; ".join(parts)


def gemm_check_key(text):
    lines = [l for l in text.splitlines() if re.search(r"cases\s+worst error", l)]
    if not lines:
        return ""
    bad = [l.split()[0] for l in lines if l.rstrip().endswith("FAIL")]
    s = f"{len(lines) - len(bad)}/{len(lines)} variants ok"
    if bad:
        s += " (FAIL: " + ", ".join(bad) + ")"
    return s


def gemm_bench_rows(text):
    """(name, dtype, form, k2, ms, tflops, ratio) per kernel line, and the cuBLAS lines."""
    rows, cublas = [], []
    for l in text.splitlines():
        m = re.match(r"cuBLAS (\w+)\s+(NT|NN)\s+M=N=K1=(\d+) K2=0\s+([\d.]+) ms\s+([\d.]+) TFLOP/s", l)
        if m:
            cublas.append((m.group(1), m.group(2), float(m.group(4)), float(m.group(5))))
            continue
        m = re.match(r"(gemm_kext_(nt|nn)_(bf16|f16)\w*)\s+M=N=K1=(\d+) K2=(\d+)\s+([\d.]+) ms\s+([\d.]+) TFLOP/s"
                     r"(?:\s+RATIO ([\d.]+))?", l)
        if m:
            rows.append((m.group(1), m.group(3), m.group(2).upper(), int(m.group(5)), float(m.group(6)),
                         float(m.group(7)), float(m.group(8)) if m.group(8) else None))
    return rows, cublas


def tile_rows(text):
    """gemm_kext_check --bench's TILES lines: the sm_80 kernels' two block tiles by shape."""
    pat = (r"TILES (NT|NN) M=(\d+) N=(\d+) K=(\d+) narrow ([\d.]+) ms wide ([\d.]+) ms cuBLAS ([\d.]+) ms "
           r"wide_tiles (\d+) sms (\d+) rule (wide|narrow)")
    return [(f, int(m), int(n), int(k), float(a), float(b), float(c), int(w), int(sm), rule)
            for f, m, n, k, a, b, c, w, sm, rule in re.findall(pat, text)]


def uc_cases(text):
    """gemm_kext_check --uc: per shape, its routes [(name, ms, x frozen or None)] and its checks."""
    cases = []
    for line in text.splitlines():
        if not line.startswith("UC "):
            continue
        body = line[3:].strip()
        m = re.match(r"T=(\d+) d_in=(\d+) d_out=(\d+) r=(\d+)$", body)
        if m:
            cases.append({"shape": f"T{m[1]} {m[2]}->{m[3]} r{m[4]}", "rows": [], "checks": []})
            continue
        if not cases:
            cases.append({"shape": "?", "rows": [], "checks": []})
        m = re.match(r"(.+?)\s+([\d.]+) ms(?:\s+\(([\d.]+)x frozen\))?$", body)
        if m:
            cases[-1]["rows"].append((m[1].strip(), float(m[2]), float(m[3]) if m[3] else None))
        else:
            cases[-1]["checks"].append(body)
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logs", required=True)
    ap.add_argument("--gpu", default="?")
    ap.add_argument("--commit", default="?")
    ap.add_argument("--total", default="?")
    ap.add_argument("--budget", default="?")
    a = ap.parse_args()
    L = a.logs
    steps = []
    for line in read(os.path.join(L, "steps.tsv")).splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            steps.append(parts)
    bench = jsonl(os.path.join(L, "bench.jsonl"))
    torch_rows = jsonl(os.path.join(L, "torch.jsonl"))
    model_rows = jsonl(os.path.join(L, "model.jsonl")) + jsonl(os.path.join(L, "torch_model.jsonl"))
    gemm_rows, cublas = gemm_bench_rows(read(os.path.join(L, "gemm_bench.log")))

    # Every number read from the JSON lines is a float or None (null, missing, text).
    def bms(shape, op):
        for r in bench:
            if r.get("shape") == shape and r.get("op") == op:
                return num(r.get("ms")), num(r.get("ratio_to_frozen"))
        return None, None

    def tms(shape, op):
        for r in torch_rows:
            if r.get("shape") == shape and r.get("op") == op:
                return num(r.get("ms")), num(r.get("ratio_to_linear"))
        return None, None

    shapes = []
    for r in bench + torch_rows:
        if r.get("shape") not in shapes:
            shapes.append(r.get("shape"))
    # Tuned (timed once per shape, then the winner) is a column of its own; "best" looks only at
    # the concrete paths.
    # ComposedTiles: Composed with the rank-r products on the tile kernels instead of cuBLASLt
    # (ProductEngine::Tiles), a column for comparison, not a choice of "best".
    paths = ["Composed", "ComposedTiles", "Fused", "FusedSm90", "Tuned"]
    concrete = ["Composed", "Fused", "FusedSm90"]

    def best(shape, method, kind):
        """The fastest path of `method` ('wegeft' / 'lora') for `kind`: (path, ms, ratio)."""
        got = []
        for p in concrete:
            ms, r = bms(shape, f"{method} {kind} {p}")
            if ms is not None and math.isfinite(ms):
                got.append((ms, p, r))
        if not got:
            return None
        ms, p, r = min(got, key=lambda g: g[0])
        return p, ms, r

    # Key numbers per step.
    keys = {}
    for name, status, secs in steps:
        text = read(os.path.join(L, f"{name}.log"))
        if is_sanitizer_step(name):
            keys[name] = sanitizer_key(text)
        elif name == "gemm_check":
            keys[name] = gemm_check_key(text)
        elif name == "torch_abi":
            m = re.search(r"^(ok: .*|\d+ of \d+ checks failed)$", text, re.M)
            keys[name] = m.group(1) if m else ""
        elif name in ("attn_bench", "attn_torch"):
            # Attention ms per sequence length; attn_torch also gives wegeft's time / SDPA's.
            pat = r'"seq":(\d+),"fwd_ms":([\d.]+),"bwd_ms":([\d.]+)'
            ours = {int(m[0]): (float(m[1]), float(m[2])) for m in re.findall(pat, read(os.path.join(L, "attn_bench.log")))}
            parts = []
            for sq, f, b in re.findall(pat, text):
                sq, f, b = int(sq), float(f), float(b)
                p = f"S={sq}: fwd {f:.3f} ms, bwd {b:.3f} ms"
                if name == "attn_torch" and sq in ours:
                    p += (f" (wegeft/SDPA time: fwd {fmt(div(ours[sq][0], f), '.2f')}x, "
                          f"bwd {fmt(div(ours[sq][1], b), '.2f')}x)")
                parts.append(p)
            if name == "attn_bench":
                wpat = r'"seq":(\d+),"window":(\d+),"fwd_ms":([\d.]+),"bwd_ms":([\d.]+)'
                for sq, w, f, b in re.findall(wpat, text):
                    sq, f, b = int(sq), float(f), float(b)
                    p = f"S={sq} window {w}: fwd {f:.3f} ms, bwd {b:.3f} ms"
                    if sq in ours:
                        p += (f" ({fmt(div(f, ours[sq][0]), '.2f')}x, {fmt(div(b, ours[sq][1]), '.2f')}x "
                              f"causal's time)")
                    parts.append(p)
                bad = [l.strip() for l in text.splitlines() if "MISMATCH" in l]
                if bad:
                    parts.append(f"{len(bad)} MISMATCH vs the plain kernels: {bad[0]}")
            keys[name] = "; ".join(parts)
        elif name == "gemm_bench":
            # Time over cuBLAS's of the fastest bf16 kernel, and the sm_80 (mma.sync) kernels' best
            # speed per form (either block tile; issue 3's target is >= 0.60x cuBLAS's speed).
            short = lambda n: n.replace("gemm_kext_", "")
            best_of = lambda rs: min(rs, key=lambda r: r[6]) if rs else None
            parts, fastest, sm80 = [], [], []
            for k2 in (0, 64):
                r = best_of([r for r in gemm_rows if r[1] == "bf16" and r[3] == k2 and r[6] is not None])
                if r:
                    fastest.append(f"K2={k2} {r[6]:.2f} ({short(r[0])})")
            for form in ("NT", "NN"):
                r = best_of([r for r in gemm_rows if r[1] == "bf16" and r[2] == form and r[3] == 0 and r[6]
                             and re.fullmatch(r"gemm_kext_(nt|nn)_bf16(_wide)?", r[0])])
                if r:
                    sm80.append(f"{form} {1 / r[6]:.2f}x ({short(r[0])})")
            if fastest:
                parts.append("bf16 time x cuBLAS's: " + ", ".join(fastest))
            if sm80:
                parts.append("sm_80 speed: " + ", ".join(sm80))
            if not parts and "cuBLAS not available" in text:
                parts.append("cuBLAS not loaded")
            keys[name] = "; ".join(parts)
        elif name == "gemm_uc":
            # Per shape: each one-launch kernel against the fastest other route of its pass, and
            # whether the routes' outputs agreed (every check line says yes; the whole table is
            # below the summary).
            parts = []
            for c in uc_cases(text):
                agree = "outputs agree" if c["checks"] and all(ch.endswith("yes") for ch in c["checks"]) else "MISMATCH or missing"
                cells = []
                for bwd in (False, True):
                    rows = [r for r in c["rows"] if r[0].startswith("bwd:") == bwd]
                    one = [r for r in rows if "one launch" in r[0]]
                    others = [r for r in rows if "one launch" not in r[0] and "alone" not in r[0] and "frozen" not in r[0]]
                    best_other = min(others, key=lambda r: r[1]) if others else None
                    if one:
                        cell_other = f", best other {fmt_ms(best_other[1], best_other[2])}" if best_other else ""
                        cells.append(f"{'bwd' if bwd else 'fwd'} one launch {fmt_ms(one[0][1], one[0][2])}{cell_other}")
                parts.append(f"{c['shape']}: " + ", ".join(cells) + f", {agree}")
            keys[name] = "; ".join(parts)
        elif name == "gemm_kscan":
            # KSCAN lines: fixed cost and cost per 1024 of K, cuBLAS and the TMA kernel.
            pat = r"KSCAN (\S+)\s.*fixed ([\d.]+) us\s+per 1024 of K ([\d.]+) us"
            keys[name] = "; ".join(f"{n}: fixed {a} us, {b} us per 1024 of K" for n, a, b in re.findall(pat, text))
        elif name == "bench":
            parts = []
            if shapes:
                sh = shapes[0]
                for kind in ("fwd", "bwd"):
                    b = best(sh, "wegeft", kind)
                    if b:
                        if b[2] is None:  # no frozen time to compare with (its row failed)
                            parts.append(f"WeGeFT {kind} {fmt(b[1])} ms ({b[0]}; no frozen time)")
                        else:
                            parts.append(f"WeGeFT {kind} time {fmt(b[2], '.2f')}x frozen's ({b[0]})")
                if parts:
                    parts[0] = f"{sh}: " + parts[0]
            fails = len(re.findall(r"FAILED", text))
            if fails:
                parts.append(f"{fails} rows FAILED")
            bad = [l.strip() for l in text.splitlines() if "MISMATCH" in l]
            if bad:
                parts.append(f"{len(bad)} outputs MISMATCH the Composed path: {bad[0]}")
            if "skipped: no CUDA device" in text:
                parts.append("no CUDA device")
            keys[name] = "; ".join(parts)
        elif name == "model_bench":
            parts = [l.strip() for l in text.splitlines() if l.startswith("loss check") or "MISMATCH" in l]
            keys[name] = "; ".join(parts[:3])
        elif name == "torch_baseline":
            parts = []
            if torch_rows and shapes:
                sh = shapes[0]
                for op in ("wegeft_ref fwd", "wegeft_ref fwd+bwd"):
                    ms, r = tms(sh, op)
                    if r is not None:
                        parts.append(f"{op} time {fmt(r, '.2f')}x linear's")
                if parts:
                    parts[0] = f"{sh}: " + parts[0]
            m = re.search(r"device: [^;]*; torch ([^;]+);", text)
            if m:
                parts.append(f"torch {m.group(1)}")
            if "peft not importable" in text:
                parts.append("peft missing")
            if "skipped: no CUDA device" in text:
                parts.append("no CUDA device")
            keys[name] = "; ".join(parts)
        else:
            keys[name] = test_counts(text) or ""
        if "skipped: no CUDA device" in text and name not in ("bench", "torch_baseline", "model_bench", "torch_model") and "no CUDA" not in keys[name]:
            keys[name] = (keys[name] + "; " if keys[name] else "") + "no CUDA device"
        if status != "PASS" and text:
            err = first_error(text)
            if err not in keys[name]:
                keys[name] = (keys[name] + "; " if keys[name] else "") + err

    o = []
    o.append(f"## GPU check: {a.gpu}")
    o.append("")
    o.append(f"commit `{a.commit}`; {a.total} s of the {a.budget} s budget. "
             "bf16; CUDA events; median of reps with the L2 flushed before each (wegeft bench, PyTorch); "
             "GEMM core: mean of 50 back-to-back launches.")
    o.append("")
    o.append("| step | status | s | key result |")
    o.append("|---|---|---|---|")
    for name, status, secs in steps:
        o.append(f"| {name} | {status} | {secs} | {cell(keys.get(name, ''))} |")

    if bench:
        o.append("")
        o.append("### Layer (wegeft, `benches/layer_cuda.rs`): ms (time x the frozen cuBLASLt GEMM's)")
        o.append("")
        o.append("Frozen: fwd `y = x W^T`, bwd `dx = G W`, fwd+bwd their sum; adapter bwd = its whole backward "
                 "(dx and the adapter's gradients).")
        o.append("")
        o.append("| shape | op | frozen | " + " | ".join(paths) + " |")
        o.append("|---|---|---|" + "---|" * len(paths))
        frozen_of = {"fwd": "frozen fwd (cuBLASLt)", "bwd": "frozen bwd dx (cuBLASLt)",
                     "fwd+bwd": "frozen fwd+bwd dx (cuBLASLt)"}
        for sh in shapes:
            if not any(r.get("shape") == sh for r in bench):
                continue
            for method in ("wegeft", "lora"):
                for kind in ("fwd", "bwd", "fwd+bwd"):
                    fz, _ = bms(sh, frozen_of[kind])
                    cells = [fmt_ms(*bms(sh, f"{method} {kind} {p}")) for p in paths]
                    o.append(f"| {sh} | {'WeGeFT' if method == 'wegeft' else 'LoRA'} {kind} | {fmt_ms(fz)} | "
                             + " | ".join(cells) + " |")
            mg, _ = bms(sh, "wegeft merge")
            if mg is not None:
                o.append(f"| {sh} | WeGeFT merge | | {fmt_ms(mg)} |" + " |" * (len(paths) - 1))

    ceil = [sh for sh in shapes if bms(sh, "kext fwd cuBLASLt (padded)")[0] is not None]
    if ceil:
        o.append("")
        o.append("### The K-extended products as one cuBLASLt GEMM on padded operands: ms (time x frozen)")
        o.append("")
        o.append("`y = [x|u][W|C]^T` (K = d_in + r) and `dx = [G|v][W;psi]` (K = d_out + r), the operands "
                 "stored padded: the floor of a fused GEMM as fast as cuBLAS, before `u`, `C`, `v` "
                 "(not a path of the crate).")
        o.append("")
        o.append("| shape | fwd | bwd | fwd+bwd | WeGeFT Composed fwd+bwd |")
        o.append("|---|---|---|---|---|")
        for sh in ceil:
            cells = [fmt_ms(*bms(sh, f"kext {k} cuBLASLt (padded)")) for k in ("fwd", "bwd", "fwd+bwd")]
            o.append(f"| {sh} | " + " | ".join(cells) + f" | {fmt_ms(*bms(sh, 'wegeft fwd+bwd Composed'))} |")
    host = [l.strip() for l in read(os.path.join(L, "bench.log")).splitlines() if " host: " in l or " graph: " in l]
    if host:
        o.append("")
        o.append("Host against device, one layer (`layer_cuda`: 20 forward + backward pairs enqueued, then a wait; "
                 "and one pair captured in a CUDA graph, replayed 20 times):")
        o.append("")
        o.extend(f"* {l}" for l in host)

    ucs = uc_cases(read(os.path.join(L, "gemm_uc.log")))
    if ucs:
        o.append("")
        o.append("### The fused forward's and input gradient's routes (`gemm_kext_check --uc`, bf16): ms "
                 "(time x cuBLAS's frozen x W^T, or G W for the bwd rows)")
        o.append("")
        o.append("| shape | route | ms |")
        o.append("|---|---|---|")
        for c in ucs:
            for r in c["rows"]:
                o.append(f"| {c['shape']} | {cell(r[0])} | {fmt_ms(r[1], r[2])} |")
            if c["checks"]:
                o.append(f"| {c['shape']} | checks | {cell('; '.join(c['checks']))} |")

    if gemm_rows or cublas:
        o.append("")
        o.append("### GEMM core (`kernels/gemm_kext.cu`) at M=N=K1=4096: ms, TFLOP/s "
                 "(time x cuBLAS's of the same form, K2=0; lower is better)")
        o.append("")
        o.append("| kernel | form | K2 | ms | TFLOP/s | time x cuBLAS's |")
        o.append("|---|---|---|---|---|---|")
        for dt, form, ms, tf in cublas:
            o.append(f"| cuBLAS GemmEx {dt} | {form} | 0 | {ms:.3f} | {tf:.0f} | 1.00 |")
        for name, dt, form, k2, ms, tf, ratio in gemm_rows:
            o.append(f"| {name} | {form} | {k2} | {ms:.3f} | {tf:.0f} | {'—' if ratio is None else f'{ratio:.2f}'} |")

    tiles = tile_rows(read(os.path.join(L, "gemm_bench.log")))
    if tiles:
        o.append("")
        o.append("### The sm_80 kernels' block tiles (bf16, K2=0): ms (time x cuBLAS's); the launcher's rule "
                 "takes the wide tile once its tiles give every SM one (`gemm::tc_wide`)")
        o.append("")
        o.append("| form | M x N x K | 128 x 128 | 128 x 256 (wide) | cuBLAS | wide tiles / SMs | rule | faster |")
        o.append("|---|---|---|---|---|---|---|---|")
        for f, m, n, k, a_ms, b_ms, c_ms, w, sm, rule in tiles:
            rel = lambda v: f"{v:.4f}" + (f" ({v / c_ms:.2f}x)" if c_ms > 0 else "")
            # Within 2% of each other: a tie, which either choice of the rule fits.
            faster = "tie" if abs(a_ms - b_ms) <= 0.02 * min(a_ms, b_ms) else ("wide" if b_ms < a_ms else "narrow")
            flag = "" if faster in (rule, "tie") else " (rule differs)"
            o.append(f"| {f} | {m} x {n} x {k} | {rel(a_ms)} | {rel(b_ms)} | {c_ms:.4f} | {w} / {sm} | {rule} | {faster}{flag} |")

    if torch_rows:
        o.append("")
        o.append("### PyTorch (`torch_baseline.py`): ms (time x F.linear's of the same kind)")
        o.append("")
        tops = ["linear", "wegeft_ref", "lora_peft", "peft_lora"]
        o.append("| shape | kind | F.linear | WeGeFT official-style | LoRA (F.linear) | peft LoRA |")
        o.append("|---|---|---|---|---|---|")
        for sh in shapes:
            if not any(r.get("shape") == sh for r in torch_rows):
                continue
            for kind in ("fwd", "fwd+bwd"):
                cells = []
                for t in tops:
                    ms, r = tms(sh, f"{t} {kind}")
                    cells.append(fmt_ms(ms, None if t == "linear" else r))
                o.append(f"| {sh} | {kind} | " + " | ".join(cells) + " |")

    if bench and torch_rows:
        o.append("")
        o.append("### wegeft (fastest path) vs PyTorch: ms, speed-up = PyTorch / wegeft")
        o.append("")
        o.append("| shape | kind | frozen (cuBLASLt) | F.linear | WeGeFT (path) | official-style | speed-up | "
                 "LoRA (path) | peft LoRA | speed-up |")
        o.append("|---|---|---|---|---|---|---|---|---|---|")
        for sh in shapes:
            for kind in ("fwd", "fwd+bwd"):
                fz, _ = bms(sh, "frozen fwd (cuBLASLt)" if kind == "fwd" else "frozen fwd+bwd dx (cuBLASLt)")
                lin, _ = tms(sh, f"linear {kind}")
                row = [sh, kind, fmt_ms(fz), fmt_ms(lin)]
                for method, ref in (("wegeft", "wegeft_ref"), ("lora", "peft_lora")):
                    b = best(sh, method, kind)
                    t, _ = tms(sh, f"{ref} {kind}")
                    if t is None and method == "lora":
                        t, _ = tms(sh, f"lora_peft {kind}")
                    row.append(f"{fmt(b[1])} ({b[0]})" if b else "—")
                    row.append(fmt_ms(t))
                    sp = div(t, b[1]) if b else None
                    row.append(f"{sp:.2f}x" if sp is not None else "—")
                o.append("| " + " | ".join(row) + " |")
    if model_rows:
        o.append("")
        o.append("### Training step, SmolLM2-135M shapes, random weights, bf16 (`benches/model_cuda.rs`, `torch_model.py`)")
        o.append("")
        o.append("Forward + backward + AdamW over the adapter; median step; peak = device memory high-water mark "
                 "(wegeft: the memory pool; PyTorch: max_memory_allocated), weights included. "
                 "Speed-up = wegeft tokens/s over the row's.")
        o.append("")
        o.append("Loss: the last timed step's (a missing or non-finite loss shows as — or NaN); "
                 "first: the warm-up step's, before any update.")
        o.append("")
        o.append("| targets | impl | B x S | r | tokens/s | step ms | peak GiB | loss (first) | wegeft speed-up | "
                 "wegeft peak / this | launches / step (step µs per launch) |")
        o.append("|---|---|---|---|---|---|---|---|---|---|---|")

        def tkey(r):
            t = r.get("targets")
            return ",".join(str(x) for x in t) if isinstance(t, list) else str(t or "?")
        for tk in sorted({tkey(r) for r in model_rows}, key=len):
            rows = [r for r in model_rows if tkey(r) == tk]
            ours = next((r for r in rows if r.get("impl") == "wegeft-cuda"), None)
            label = "q,v" if tk == "q_proj,v_proj" else ("all seven" if tk.count(",") == 6 else tk)
            for r in rows:
                sp = div(ours.get("tokens_per_s"), r.get("tokens_per_s")) if ours and r is not ours else None
                mem = div(ours.get("peak_mem_bytes"), r.get("peak_mem_bytes")) if ours and r is not ours else None
                step_ms = num(r.get("step_s"))
                peak = num(r.get("peak_mem_bytes"))
                loss = fmt(r.get("loss"))
                if "first_loss" in r:
                    loss += f" ({fmt(r.get('first_loss'))})"
                o.append(f"| {label} | {r.get('impl')} | {r.get('batch')} x {r.get('seq')} | {r.get('rank')} | "
                         f"{fmt(r.get('tokens_per_s'), '.0f')} | {fmt(None if step_ms is None else step_ms * 1e3, '.1f')} | "
                         f"{fmt(None if peak is None else peak / 2**30, '.2f')} | {loss} | "
                         f"{'—' if sp is None else f'{sp:.2f}x'} | {'—' if mem is None else f'{mem:.2f}'} | "
                         f"{launch_cell(r)} |")
    abi = [l for l in read(os.path.join(L, "torch_abi.log")).splitlines() if l.startswith("|")]
    if abi:
        o.append("")
        o.append("### The PyTorch layer over the C ABI (`examples/python/wegeft_torch.py`), bf16 forward + backward")
        o.append("")
        o.extend(abi)
    # The table's header shares its line with libtest's "test bench_multi ... " (--nocapture).
    multi = [l[l.index("|"):] for l in read(os.path.join(L, "multi_bench.log")).splitlines()
             if l.startswith("|") or "| shape" in l]
    if multi:
        o.append("")
        o.append("### Many adapters in one batch (`cuda_multi bench_multi`, bf16, rank 16): ms")
        o.append("")
        o.extend(multi)
    print("\n".join(o))
    return 0


if __name__ == "__main__":
    sys.exit(main())
