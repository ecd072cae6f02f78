#!/usr/bin/env python3
"""Writes tests/data/tekken/cases.json, the reference for the `tekken` pre-tokenizer (Mistral
NeMo, Mistral Small 3, Ministral: llama.cpp's `tokenizer.ggml.pre = tekken`), computed by
implementations independent of this crate from Mistral's own tokenizer file:

* the tokenizer: `tekken_240718.json` (Mistral NeMo's, July 2024) from the PyPI wheel
  mistral-common==1.13.1, which scripts/fetch-model.sh puts in .cache/tekken/ (sha256 checked);
* transformers' `convert_tekken_tokenizer` turns it into the `tokenizers` library's tokenizer,
  as the `tokenizer.json` of Mistral's HF checkpoints is (a Split on tekken's regex, byte-level
  BPE with `ignore_merges`, 1000 special tokens first), which llama.cpp's converter reads for its
  GGUFs;
* cases.json: the sha256 of the tekken file; the 1000 special tokens (ids 0..999); the sha256
  of the BPE vocabulary (tokens in id order, one per line) and of the merges ("a b", one per
  line, in priority order), so that tests/tekken.rs can check that it derives the same
  vocabulary and merges from the tekken file; and the `tokenizers` library's ids for strings
  that exercise tekken's rules (case changes inside words, digits one by one, punctuation runs
  keeping their newlines and slashes). mistral-common's own `Tekkenizer` is checked to give the
  same ids.

    /tmp/pt/bin/pip install transformers tokenizers mistral-common
    bash scripts/fetch-model.sh >/dev/null
    /tmp/pt/bin/python scripts/tekken_reference.py --tekken .cache/tekken/tekken_240718.json
"""
import argparse
import hashlib
import json
import os

from tokenizers import Tokenizer
from transformers.integrations.mistral import convert_tekken_tokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "data", "tekken")

STRINGS = [
    "Hello world",
    "The capital of France is",
    "  leading spaces and trailing   ",
    "I'm sure they'll've DONE it, we'd SAY.",
    "CAN'T won'T You'RE",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000",
    "line one\nline two\r\n\nline four\n\n\n",
    "tabs\tand\t\tmore\ttabs",
    "punctuation!!! ...??? (brackets) [x] {y} <z> #hash @at $5 %20",
    "paths a/b/c ./x/../y //\n// comment\n/*\n block */",
    # A punctuation run keeps the newlines and slashes after it (Llama 3's regex leaves the
    # slash to the next word): these split otherwise under Llama 3's rules.
    "cd ~;\n/usr/local/bin/python",
    "See:\n/docs/index.html",
    "1.\n/a 2.\n/b",
    "a,\n/b;\r\n/c",
    "});\n/**\n * doc\n */",
    "café naïve résumé – “quotes” — ‘single’",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀🎉👍🏽 and symbols ∑∫√",
    "code: def f(x):\n    return x**2  # square\n",
    "mixedCASE snake_case kebab-case CamelCase HTTPServer iPhone McDonald's ABCdef",
    "[INST] What is 345 + 678? [/INST]",
    "a" * 40 + " " + "ab" * 20,
    "Tiếng Việt có nhiều điều hợp lý; İran ایران; gidiyor-lardan yapılmaktadır",
    "Ǆemal ǅemal ǆemal Σίσυφος ΣΊΣΥΦΟΣ",
    "   \n  \n",
    "",
]


def sha(lines):
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tekken", required=True, help="tekken_240718.json from mistral-common==1.13.1")
    a = ap.parse_args()
    tekken_sha = hashlib.sha256(open(a.tekken, "rb").read()).hexdigest()
    hf = convert_tekken_tokenizer(a.tekken)
    tmp = os.path.join(OUT, "tmp-hf")
    hf.save_pretrained(tmp)
    path = os.path.join(tmp, "tokenizer.json")
    j = json.load(open(path, encoding="utf-8"))
    tok = Tokenizer.from_file(path)
    model = j["model"]
    assert model["type"] == "BPE" and model["ignore_merges"] and not model["byte_fallback"], model.keys()
    specials = [t["content"] for t in sorted(j["added_tokens"], key=lambda t: t["id"])]
    assert [t["id"] for t in j["added_tokens"]] == list(range(len(specials))) and all(t["special"] for t in j["added_tokens"])
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab))), "ids are not dense"
    assert [t for t, _ in vocab[:len(specials)]] == specials
    merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in model["merges"]]
    print(f"{len(vocab)} tokens ({len(specials)} special), {len(merges)} merges")
    print("pre-tokenizer:", json.dumps(j["pre_tokenizer"]))

    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    mc = Tekkenizer.from_file(a.tekken)
    cases = []
    for s in STRINGS:
        ids = tok.encode(s, add_special_tokens=False).ids
        theirs = mc.encode(s, bos=False, eos=False)
        # mistral-common reads "[INST]" in plain text as text; tokenizers matches special tokens.
        if "[INST]" not in s:
            assert ids == theirs, (s, ids, theirs)
        cases.append(dict(text=s, ids=ids))
    ref = dict(
        tekken_json_sha256=tekken_sha,
        vocab_size=len(vocab),
        specials=specials,
        vocab_sha256=sha([t for t, _ in vocab[len(specials):]]),
        merges=len(merges),
        merges_sha256=sha(merges),
        pattern=j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"],
        cases=cases,
        versions=dict(transformers=__import__("transformers").__version__, tokenizers=__import__("tokenizers").__version__,
                      mistral_common=__import__("mistral_common").__version__),
    )
    os.makedirs(OUT, exist_ok=True)
    json.dump(ref, open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8"), ensure_ascii=False, indent=0)
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    print("cases.json", os.path.getsize(os.path.join(OUT, "cases.json")))


if __name__ == "__main__":
    main()
