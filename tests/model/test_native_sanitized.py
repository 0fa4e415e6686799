"""The native kernels built with AddressSanitizer and UndefinedBehaviorSanitizer, run through the native
tests on every instruction-set path this CPU has (test_native.py forces each one): an out-of-bounds read
or write, or undefined behaviour, in kernels.c fails the run. Also: torch's own int4/int8 kernels (the
path without native code) under torch's default CPU dispatch and under ATEN_CPU_CAPABILITY=avx2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit import native

ROOT = Path(__file__).resolve().parents[2]


def _libasan() -> str | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    r = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = r.stdout.strip()
    return path if r.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def _pytest(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.why_not()}")
def test_native_kernels_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    asan = _libasan()
    if asan is None:
        pytest.skip("the C compiler has no AddressSanitizer runtime (libasan)")
    r = _pytest(["tests/model/test_native.py", "-k", "not cli and not unbuildable"],
                {"LOWBIT_NATIVE_SANITIZE": "1", "LD_PRELOAD": asan, "LOWBIT_CACHE": str(tmp_path),
                 "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "UBSAN_OPTIONS": "print_stacktrace=1"})
    said = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, said
    assert "ERROR: AddressSanitizer" not in said and "runtime error" not in said, said
    assert list((tmp_path / "native").glob("*.so")), "no sanitized build was made"
    assert " passed" in r.stdout and " skipped" not in r.stdout.splitlines()[-1], said


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_torch_kernels_without_native_code_under_each_cpu_dispatch(capability):
    env = {"LOWBIT_NATIVE": "0"}
    if capability != "default":
        env["ATEN_CPU_CAPABILITY"] = capability
    r = _pytest(["tests/model/test_kernels.py"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
