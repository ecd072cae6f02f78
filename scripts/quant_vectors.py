#!/usr/bin/env python3
"""Writes test vectors for the GGUF dequantizer (src/model/weights/gguf.rs) into
tests/data/quants/: for every ggml block type below, NAME.bin holds BLOCKS random blocks and
NAME.f32 the values that gguf-py (llama.cpp's Python package, an implementation independent of
ours) dequantizes them to, as little-endian f32. The f16 scale fields are set to finite values
of a realistic size; every other byte is random, so every bit of every quant field is used.

    python -m venv /tmp/gg && /tmp/gg/bin/pip install gguf==0.19.0 numpy
    /tmp/gg/bin/python scripts/quant_vectors.py

tests/model_loading.rs `dequantize_matches_gguf_py` compares against these files. The script
also writes tests/data/quants/gguf_py_kquants.gguf with gguf-py's own GGUFWriter (one row of
two blocks of each K-quant; `reads_k_quants_written_by_gguf_py`), which is also a fuzz seed
(fuzz/seeds/gguf/kquants.gguf).
"""
import os
import sys

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

BLOCKS = 4
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "quants")

# Byte offsets of the f16 fields of each block type (ggml's block_* structs).
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],  # scales[16], qs[64], d, dmin
    T.Q3_K: [108],  # hmask[32], qs[64], scales[12], d
    T.Q4_K: [0, 2],  # d, dmin, scales[12], qs[128]
    T.Q5_K: [0, 2],  # d, dmin, scales[12], qh[32], qs[128]
    T.Q6_K: [208],  # ql[128], qh[64], scales[16] (i8), d
    T.IQ4_NL: [0],  # d, qs[16]
    T.IQ4_XS: [0],  # d, scales_h, scales_l[4], qs[128]
}


def main() -> int:
    rng = np.random.default_rng(20261129)
    os.makedirs(OUT, exist_ok=True)
    for qtype, fields in F16_FIELDS.items():
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(BLOCKS, size), dtype=np.uint8)
        for b in range(BLOCKS):
            for off in fields:
                # d in [1e-3, 0.1), either sign (a negative dmin occurs in real files too).
                v = np.float16(rng.uniform(1e-3, 0.1) * rng.choice([-1.0, 1.0]))
                raw[b, off : off + 2] = np.frombuffer(v.tobytes(), dtype=np.uint8)
        values = dequantize(raw.reshape(-1), qtype).astype("<f4").reshape(-1)
        assert values.size == BLOCKS * block and np.isfinite(values).all()
        with open(os.path.join(OUT, f"{qtype.name}.bin"), "wb") as f:
            f.write(raw.tobytes())
        with open(os.path.join(OUT, f"{qtype.name}.f32"), "wb") as f:
            f.write(values.tobytes())
        print(f"{qtype.name}: {BLOCKS} blocks of {block} values ({size} bytes each)")
    import gguf
    import shutil

    path = os.path.join(OUT, "gguf_py_kquants.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    for qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        size = GGML_QUANT_SIZES[qtype][1]
        raw = np.fromfile(os.path.join(OUT, f"{qtype.name}.bin"), dtype=np.uint8)
        w.add_tensor(f"t.{qtype.name}", raw[: 2 * size].reshape(1, 2 * size), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    seeds = os.path.join(OUT, "..", "..", "..", "fuzz", "seeds", "gguf")
    shutil.copy(path, os.path.join(seeds, "kquants.gguf"))
    print(f"{path} (and the fuzz seed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
