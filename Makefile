# The two set-up commands of the README: `make demo` and `make test`. Both install from nothing;
# the demo installs only what it needs (no llama.cpp build), the tests everything.
.PHONY: setup setup-test demo test test-fast test-native bench

setup:
	@bash scripts/setup.sh demo

setup-test:
	@bash scripts/setup.sh test

demo: setup
	.venv/bin/lowbit quantize --model smollm2-135m --recipe w4-g128 --method gptq --calib mix --samples 16 --seq-len 256 \
		--out out/smollm2-w4 --force
	.venv/bin/lowbit info out/smollm2-w4
	.venv/bin/lowbit generate out/smollm2-w4 --prompt "What is the capital of France?"

# Everything, the slow real-model tests included (CI runs this).
test: setup-test
	.venv/bin/python -m pytest -q

test-fast: setup-test
	.venv/bin/python -m pytest -q -m "not slow"

# The native kernels on every instruction-set path this CPU has, built with AddressSanitizer and
# UndefinedBehaviorSanitizer (also part of `make test`, as a slow test).
test-native: setup-test
	.venv/bin/python -m pytest -q tests/model/test_native.py tests/model/test_native_sanitized.py

# Every benchmark that writes docs/BENCHMARKS.md (a few hours on 2 cores).
bench: setup-test
	.venv/bin/python benchmarks/presets.py
	.venv/bin/python benchmarks/load_memory.py
	.venv/bin/python benchmarks/gate.py
	.venv/bin/python benchmarks/decode_speed.py --kv
	.venv/bin/python benchmarks/decode_speed.py --model gemma3-270m
	.venv/bin/python benchmarks/native_paths.py
	.venv/bin/python benchmarks/export.py
	test -x .peers/llmc-venv/bin/python || bash benchmarks/peers/setup_llmcompressor.sh .peers/llmc-venv
	.venv/bin/python benchmarks/calibrated.py --samples 32 --llmcompressor .peers/llmc-venv/bin/python
	.venv/bin/python benchmarks/calib_memory.py speed
	.venv/bin/python benchmarks/calib_memory.py capped --cap-gb 3.0
	.venv/bin/python benchmarks/sink_share.py
	.venv/bin/python benchmarks/learned_qat.py learned --schemes w4-g128,w3-g128 --calib-windows 256
	.venv/bin/python benchmarks/learned_qat.py qat
	.venv/bin/python benchmarks/artifact_memory.py
