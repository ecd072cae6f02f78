#!/usr/bin/env python3
"""Writes the SentencePiece reference data of tests/spm_tokenizer.rs into tests/data/spm/.

Llama 1/2, TinyLlama, Mistral 7B v0.1 and CodeLlama GGUFs carry a SentencePiece BPE vocabulary
(`tokenizer.ggml.model = "llama"`: pieces, scores, token types). No such model's tokenizer is
reachable here (only PyPI is), so this script trains one with the `sentencepiece` library in
Llama 2's configuration (BPE, byte fallback, digits split, identity normalization, a dummy
prefix, extra whitespace kept), then

* tokenizer.gguf — its vocabulary as llama.cpp's converter writes it, with gguf-py's own
  `SentencePieceVocab` (pieces, scores, token types) and `SpecialVocab` (bos/eos/unk, add_bos);
* cases.json — `sentencepiece`'s ids for texts that exercise merges, spaces, newlines, digits
  and byte fallback.

    /tmp/pt/bin/pip install sentencepiece gguf
    /tmp/pt/bin/python scripts/spm_reference.py
"""
import inspect
import json
import os
import pkgutil
import tempfile
from pathlib import Path

import sentencepiece as spm
from gguf import GGUFWriter, SentencePieceVocab, SpecialVocab

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "data", "spm")

CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, and   three inside",
    "trailing space ",
    "line one\nline two\n\nline four\n",
    "tabs\there",
    "numbers 1 12 123 2024 3.14159",
    "Return the value of the attribute; raise AttributeError otherwise.",
    "café naïve – “quotes” 日本語 😀",
    "[INST] What is 345 + 678? [/INST]",
    "x",
    " ",
    "",
]


def corpus():
    """English from the docstrings of the standard library, plus a few other scripts."""
    lines = []
    for m in pkgutil.iter_modules():
        if len(lines) > 40000 or m.name.startswith("_") or m.name in ("antigravity", "this", "idlelib", "tkinter", "turtledemo"):
            continue
        try:
            mod = __import__(m.name)
        except Exception:
            continue
        for _, obj in inspect.getmembers(mod):
            d = inspect.getdoc(obj) if callable(obj) else None
            if d:
                lines.extend(l for l in d.splitlines() if l.strip())
    lines += ["Grüße aus Köln, naïve façade", "Привет, мир", "mañana será otro día"] * 20
    return lines


def main():
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        text = os.path.join(d, "corpus.txt")
        with open(text, "w") as f:
            f.write("\n".join(corpus()))
        prefix = os.path.join(d, "tokenizer")
        spm.SentencePieceTrainer.train(
            input=text, model_prefix=prefix, model_type="bpe", vocab_size=1200,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2,
            minloglevel=2)
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
        vocab = SentencePieceVocab(Path(d))
        special = SpecialVocab(Path(d), load_merges=False, n_vocab=vocab.vocab_size)
        special._set_special_token("bos", sp.bos_id())
        special._set_special_token("eos", sp.eos_id())
        special._set_special_token("unk", sp.unk_id())
        special.add_special_token["bos"] = True
        special.add_special_token["eos"] = False
        w = GGUFWriter(os.path.join(OUT, "tokenizer.gguf"), "llama")
        tokens, scores, types = [], [], []
        for t, s, ty in vocab.all_tokens():
            tokens.append(t)
            scores.append(s)
            types.append(ty)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        special.add_to_gguf(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        cases = [dict(text=t, ids=sp.encode(t), decoded=sp.decode(sp.encode(t))) for t in CASES]
        json.dump(dict(vocab_size=sp.vocab_size(), sentencepiece=spm.__version__, cases=cases),
                  open(os.path.join(OUT, "cases.json"), "w"), ensure_ascii=False, indent=0)
        for c in cases:
            print(repr(c["text"]), c["ids"][:12])
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))


if __name__ == "__main__":
    main()
