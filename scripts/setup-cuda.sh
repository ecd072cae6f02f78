#!/usr/bin/env bash
# Installs nvcc 13.0 (and the CUDA headers the kernels need) from PyPI wheels into the ignored
# .cuda/ folder of the project, so that `cargo build --features cuda` works on a machine with
# no CUDA toolkit and no GPU. Pinned to 13.0: the GPU machines run driver 580 (CUDA 13.0),
# which rejects PTX from a newer toolkit.
#
# Idempotent: a second run with everything in place only prints the nvcc path.
# Result: .cuda/bin/nvcc (a stable symlink; build.rs looks there last).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.cuda"
py="$dest/py"
want="13.0"
pkgs=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-cccl==13.0.*"
)

have_nvcc() {
  [ -x "$dest/bin/nvcc" ] && "$dest/bin/nvcc" --version 2>/dev/null | grep -q "release $want"
}

if ! have_nvcc; then
  PIP="${PIP:-}"
  if [ -z "$PIP" ]; then
    if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
      PIP="python3 -m pip"
    elif command -v pip3 >/dev/null 2>&1; then
      PIP="pip3"
    else
      echo "setup-cuda.sh: needs python3 with pip (apt-get install python3-pip)" >&2
      exit 1
    fi
  fi
  rm -rf "$py" "$dest/bin"
  mkdir -p "$py"
  echo "setup-cuda.sh: installing nvcc $want from PyPI into $dest (about 150 MB)" >&2
  PIP_ROOT_USER_ACTION=ignore $PIP install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$py" "${pkgs[@]}" >&2
  cu="$py/nvidia/cu13"
  if [ ! -x "$cu/bin/nvcc" ]; then
    echo "setup-cuda.sh: nvcc not found under $cu/bin after install" >&2
    exit 1
  fi
  # nvcc looks for cicc under ../nvvm/bin relative to itself, and for crt headers / cudart
  # under ../include and ../lib: the cu13 folder is laid out as a CUDA_HOME already.
  # nvcc finds them through nvcc.profile relative to its own, unresolved, path: a symlink to it
  # would not do, so .cuda/bin/nvcc is a tiny wrapper that runs the real one.
  mkdir -p "$dest/bin"
  ln -sfn "py/nvidia/cu13" "$dest/home"
  for tool in nvcc ptxas; do
    printf '#!/bin/sh\nexec "$(dirname "$0")/../home/bin/%s" "$@"\n' "$tool" >"$dest/bin/$tool"
    chmod +x "$dest/bin/$tool"
  done
  if ! have_nvcc; then
    echo "setup-cuda.sh: installed, but $dest/bin/nvcc --version does not say release $want:" >&2
    "$dest/bin/nvcc" --version >&2 || true
    exit 1
  fi
fi
echo "$dest/bin/nvcc"
