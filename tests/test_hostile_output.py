"""Hostile or unlucky outputs: a run killed mid-write, two runs racing to one --out, an --out that is
the input model, a link, '.', or the current folder, and generation sizes beyond the model's context.
Each fails with a LowbitError (CLI: exit 2, one paragraph) before any work, and nothing that should
stay is replaced, written through, or left half-written."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lowbit
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.exporters import gguf as g
from lowbit.model import artifact
from lowbit.model.artifact import clean_stale_temps, move_into_place, prepare_out_dir, temp_beside
from lowbit.runtime.generate import MAX_NEW_TOKENS, check_length
from tests.conftest import make_tiny_llama
from tests.test_cli import assert_clean_failure, run

REPO = Path(__file__).resolve().parents[1]


# -- helpers -----------------------------------------------------------------------------------------
def snapshot(path: Path) -> dict:
    """Every file under path (or path itself): bytes' sha256 and mtime, to prove nothing was touched."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                                                 p.stat().st_mtime_ns) for p in files}


def leftovers(folder: Path) -> list[str]:
    """Hidden temporaries or lock files a writer left in folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(p.pid, 0)
    return p.pid


def stale_name(target: str, pid: int, start: int = 12345, host: str | None = None, suffix: str = "") -> str:
    return f".{target}.tmp-{pid}-{host or artifact._host_marker()}-{start}-deadbeef{suffix}"


@pytest.fixture(scope="module")
def art(tiny_dir, tmp_path_factory) -> Path:
    """A W8 artifact of the tiny model."""
    out = tmp_path_factory.mktemp("hostile") / "w8"
    assert run("quantize", "--model", tiny_dir, "--recipe", "int8", "--out", out).exit_code == 0
    return out


@pytest.fixture(scope="module")
def q(tiny_dir):
    """The tiny model quantized in memory (int8, RTN)."""
    return lowbit.quantize(str(tiny_dir), "int8")


@pytest.fixture()
def no_work(monkeypatch):
    """Any quantize/export/generate work past the checks fails the test (the CLI would exit 1, not 2)."""
    def boom(*a, **k):
        raise AssertionError("the work started before the output/limits were checked")

    for name in ("_quantize", "_export", "load_model"):
        monkeypatch.setattr(api, name, boom)


# -- 1. temporaries of a killed run are removed by the next run; a live run's are kept ----------------
def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tiny_dir, tmp_path):
    pid = dead_pid()
    me = os.getpid()
    dead = [stale_name("art", pid),                                        # the owner exited
            stale_name("art", me, start=(artifact._proc_start(me) or 0) + 1),  # the PID now names another process
            stale_name("other", pid, suffix=".f32.gguf")]                  # any lowbit temporary in the folder
    live = [f".art.tmp-{artifact._owner_tag()}-c0ffee00",                  # this (live) process's
            stale_name("art", pid, host="ffffffff" if artifact._host_marker() != "ffffffff" else "eeeeeeee"),
            ".art.tmp-abcdef12",                                           # no owner recorded: cannot tell
            "notes.txt"]
    for name in dead + live:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 4096)
    out = tmp_path / "art"
    r = run("quantize", "--model", tiny_dir, "--recipe", "int8", "--out", out)
    assert r.exit_code == 0, r.output
    for name in dead:
        assert not (tmp_path / name).exists(), name
    for name in live:
        assert (tmp_path / name / "model.safetensors").is_file(), name
    assert not (tmp_path / ".art.lock").exists()  # the lock file goes with the lock


def test_a_sigkilled_writer_leaves_a_temporary_the_next_run_removes(tiny_dir, tmp_path):
    out = tmp_path / "art"
    script = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from lowbit.model.artifact import prepare_out_dir, temp_beside
        out = Path(sys.argv[1])
        prepare_out_dir(out, False)
        tmp = temp_beside(out)
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"\\0" * 100000)
        print(tmp, flush=True)
        time.sleep(120)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    writer = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        tmp = Path(writer.stdout.readline().strip())
        assert tmp.is_dir() and tmp.parent == tmp_path
        # while it runs: its temporary is kept, and a second writer is refused before any work
        assert clean_stale_temps(tmp_path) == [] and tmp.is_dir()
        with pytest.raises(LowbitError, match=f"another lowbit run is writing it .*process {writer.pid}.*choose another --out"):
            lowbit.quantize(str(tiny_dir), "int8", out=out)
        assert tmp.is_dir() and not out.exists()
    finally:
        writer.kill()  # SIGKILL: no cleanup runs in the writer
        writer.wait()
    assert tmp.is_dir()  # what the kill left behind
    lowbit.quantize(str(tiny_dir), "int8", out=out)  # the next run beside it
    assert not tmp.exists() and (out / "lowbit.json").is_file()
    assert leftovers(tmp_path) == []


def test_stale_gguf_and_compressed_tensors_temporaries_are_removed(q, tmp_path):
    pid = dead_pid()
    stale = [stale_name("m.gguf", pid), stale_name("m.gguf", pid, suffix=".f32.gguf"),
             "." + stale_name("m.gguf", pid, suffix=".gguf") + ".tmp-0123abcd"]  # llama.cpp's own, inside ours
    for name in stale:
        (tmp_path / name).write_bytes(b"\0" * 4096)
    (tmp_path / stale_name("ct", pid)).mkdir()
    (tmp_path / stale_name("ct", pid) / "model.safetensors").write_bytes(b"\0" * 4096)
    live = tmp_path / f".m.gguf.tmp-{artifact._owner_tag()}-c0ffee00"
    live.write_bytes(b"\0")
    lowbit.export(q, format="gguf", out=tmp_path / "m.gguf")
    lowbit.export(q, format="compressed-tensors", out=tmp_path / "ct")
    assert (tmp_path / "m.gguf").is_file() and (tmp_path / "ct" / "config.json").is_file()
    assert leftovers(tmp_path) == [live.name]


def test_a_refused_write_leaves_no_folder_lock_or_temporary(tiny_dir, tmp_path):
    nf4 = lowbit.quantize(str(tiny_dir), "nf4")
    out = tmp_path / "new" / "deeper" / "ct"
    with pytest.raises(LowbitError, match="NF4"):
        lowbit.export(nf4, format="compressed-tensors", out=out)
    assert list(tmp_path.iterdir()) == []  # the folders the lock needed are gone again


# -- 2. two writers to one --out: the second fails cleanly and nothing is replaced ----------------------
@pytest.fixture()
def held_lock():
    """Hold the writer's lock on a target as another lowbit process would."""
    held = []

    def hold(target: Path) -> Path:
        lock = target.parent / f".{target.name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        held.append((fd, lock))
        return lock

    yield hold
    for fd, lock in held:
        lock.unlink(missing_ok=True)
        os.close(fd)


def test_a_second_writer_fails_while_the_lock_is_held(tiny_dir, art, tmp_path, held_lock):
    out = tmp_path / "art"
    held_lock(out)
    r = run("quantize", "--model", tiny_dir, "--recipe", "int8", "--out", out)
    assert_clean_failure(r, "another lowbit run is writing it", "process 4242", "choose another --out", out=out)
    assert leftovers(tmp_path) == [".art.lock"]

    existing = tmp_path / "existing"
    shutil.copytree(art, existing)
    before = snapshot(existing)
    held_lock(existing)
    r = run("quantize", "--model", tiny_dir, "--recipe", "w4-g32", "--out", existing, "--force")
    assert_clean_failure(r, "another lowbit run is writing it")
    assert snapshot(existing) == before  # --force does not override a running writer

    gguf_out = tmp_path / "m.gguf"
    held_lock(gguf_out)
    r = run("export", art, "--format", "gguf", "--out", gguf_out)
    assert_clean_failure(r, "another lowbit run is writing it", out=gguf_out)
    ct_out = tmp_path / "ct"
    held_lock(ct_out)
    r = run("export", art, "--format", "compressed-tensors", "--out", ct_out)
    assert_clean_failure(r, "another lowbit run is writing it", out=ct_out)


def test_an_output_that_appears_during_the_write_is_not_replaced(tiny_dir, tmp_path, monkeypatch):
    """A writer that ignores the lock creates --out while lowbit writes: the rename refuses it."""
    out = tmp_path / "art"
    real = artifact.temp_beside

    def racing(target, suffix=""):
        tmp = real(target, suffix)
        out.mkdir()
        (out / "theirs.txt").write_text("the other writer's")
        return tmp

    monkeypatch.setattr(artifact, "temp_beside", racing)
    with pytest.raises(LowbitError, match="appeared while this run was writing it.*nothing was replaced"):
        lowbit.quantize(str(tiny_dir), "int8", out=out)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert (out / "theirs.txt").read_text() == "the other writer's"
    assert leftovers(tmp_path) == []


def test_a_gguf_that_appears_during_the_write_is_not_replaced(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    real = g.temp_beside

    def racing(target, suffix=""):
        out.write_bytes(b"theirs")
        return real(target, suffix)

    monkeypatch.setattr(g, "temp_beside", racing)
    with pytest.raises(LowbitError, match="appeared while this run was writing it"):
        g.write_gguf(make_tiny_llama(), out, "F16", folder=tiny_dir, force=False)
    assert out.read_bytes() == b"theirs" and leftovers(tmp_path) == []


def test_move_into_place_rechecks_and_swaps_atomically(tmp_path):
    out = tmp_path / "art"
    prepare_out_dir(out, False)
    tmp = temp_beside(out)
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(LowbitError, match="appeared"):
        move_into_place(tmp, out)  # the lock was taken without force
    assert [p.name for p in out.iterdir()] == ["old.txt"] and not (tmp_path / ".art.lock").exists()
    prepare_out_dir(out, True)
    move_into_place(tmp, out)  # with force: swapped in, the old one removed
    assert [p.name for p in out.iterdir()] == ["new.txt"] and leftovers(tmp_path) == []


# -- 3. --out that is, holds or lies inside the input model ---------------------------------------------
def test_out_overlapping_the_input_model_is_refused_before_any_work(tiny_dir, art, tmp_path, no_work):
    src = tmp_path / "src" / "model"
    shutil.copytree(tiny_dir, src)
    before = snapshot(tmp_path / "src")
    for out, word in ((src, "is the input model"), (src / "q", "is inside the input model"),
                      (tmp_path / "src", "holds the input model")):
        r = run("quantize", "--model", src, "--recipe", "int8", "--out", out, "--force")
        assert_clean_failure(r, word, "choose an --out outside")
    assert snapshot(tmp_path / "src") == before and not (src / "q").exists()

    art_copy = tmp_path / "art"
    shutil.copytree(art, art_copy)
    before = snapshot(art_copy)
    r = run("export", art_copy, "--format", "compressed-tensors", "--out", art_copy, "--force")
    assert_clean_failure(r, "is the input model")
    r = run("export", art_copy, "--format", "gguf", "--out", art_copy / "m.gguf")
    assert_clean_failure(r, "is inside the input model")
    assert snapshot(art_copy) == before


def test_saving_over_the_loaded_folder_is_refused(art, tmp_path):
    art_copy = tmp_path / "art"
    shutil.copytree(art, art_copy)
    before = snapshot(art_copy)
    loaded = lowbit.load(art_copy)
    with pytest.raises(LowbitError, match="is the input model"):
        lowbit.save(loaded, art_copy, force=True)
    with pytest.raises(LowbitError, match="is the input model"):
        lowbit.export(loaded, format="compressed-tensors", out=art_copy, force=True)
    assert snapshot(art_copy) == before


def test_a_gguf_input_and_a_bundled_models_cache_are_protected(tiny_dir, tmp_path, monkeypatch, no_work):
    src = tmp_path / "m.gguf"
    g.write_gguf(make_tiny_llama(), src, "F16", folder=tiny_dir)
    before = snapshot(src)
    r = run("quantize", "--model", src, "--recipe", "int8", "--out", src, "--force")
    assert_clean_failure(r, "is the input model")
    r = run("export", src, "--format", "gguf", "--out", src, "--force")
    assert_clean_failure(r, "is the input model")
    assert snapshot(src) == before

    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    with pytest.raises(LowbitError, match="is inside the input model's .*models"):
        lowbit.quantize("smollm2-135m", "int8", out=cache / "models" / "x")
    with pytest.raises(LowbitError, match="holds the input model's"):
        lowbit.quantize("smollm2-135m", "int8", out=cache, force=True)


# -- 4. links, '.', '..', the current and the home folder ----------------------------------------------
def test_symlinked_out_is_refused_and_neither_link_nor_target_touched(art, tmp_path, no_work):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real)
    r = run("quantize", "--model", "smollm2-135m", "--out", link, "--force")
    assert_clean_failure(r, "is a symbolic link", "fix:")
    assert link.is_symlink() and [p.name for p in real.iterdir()] == ["keep.txt"]

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    r = run("quantize", "--model", "smollm2-135m", "--out", dangling)
    assert_clean_failure(r, "is a symbolic link")
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()

    target = tmp_path / "real.gguf"
    target.write_bytes(b"GGUF mine")
    flink = tmp_path / "l.gguf"
    flink.symlink_to(target)
    for fmt in ("gguf", "compressed-tensors"):
        r = run("export", art, "--format", fmt, "--out", flink, "--force")
        assert_clean_failure(r, "is a symbolic link")
    assert flink.is_symlink() and target.read_bytes() == b"GGUF mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "l.gguf", "link", "real", "real.gguf"]


def test_dot_dotdot_current_and_home_folders_are_refused_before_any_work(art, tmp_path, monkeypatch, no_work):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for out, words in ((".", ("names an existing folder",)), ("./", ("names an existing folder",)),
                       ("..", ("names an existing folder",)), ("sub/..", ("names an existing folder",)),
                       (str(work), ("is the current folder",)), (str(tmp_path), ("is the current folder", "holds it"))):
        r = run("quantize", "--model", "smollm2-135m", "--out", out, "--force")
        assert_clean_failure(r, *words, "fix:")
        r = run("export", art, "--format", "compressed-tensors", "--out", out, "--force")
        assert_clean_failure(r, *words)
    r = run("export", art, "--format", "gguf", "--out", ".", "--force")
    assert_clean_failure(r, "names an existing folder", "out/model.gguf")

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    r = run("quantize", "--model", "smollm2-135m", "--out", home, "--force")
    assert_clean_failure(r, "is your home folder")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["home", "work"]


# -- 5. generation sizes ---------------------------------------------------------------------------------
def test_max_new_tokens_beyond_the_cap_or_context_fail_before_loading(tiny_dir, monkeypatch, no_work):
    with pytest.raises(LowbitError, match=f"100000 is more than .*{MAX_NEW_TOKENS}.*fix"):
        lowbit.generate(tiny_dir, "Hello", max_new_tokens=100000)
    with pytest.raises(LowbitError, match="300 new tokens do not fit the model's context of 256.*--max-new-tokens 255"):
        lowbit.generate(tiny_dir, "Hello", max_new_tokens=300)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(LowbitError, match="--max-new-tokens: must be a whole number"):
            lowbit.generate(tiny_dir, "Hello", max_new_tokens=bad)
    with pytest.raises(LowbitError, match="characters, more than lowbit generates from"):
        lowbit.generate(tiny_dir, "a" * 1_000_001)
    r = run("generate", tiny_dir, "--prompt", "Hello", "-n", "100000")
    assert_clean_failure(r, "100000", str(MAX_NEW_TOKENS))
    r = run("generate", tiny_dir, "--prompt", "Hello", "-n", "300")
    assert_clean_failure(r, "context of 256", "300")


def test_a_prompt_longer_than_the_context_fails_before_generating(tiny_dir, monkeypatch):
    import lowbit.runtime.decode as decode

    model = lowbit.load(tiny_dir)
    real = decode.lean_generate
    monkeypatch.setattr(decode, "lean_generate", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(LowbitError, match=r"300 prompt tokens \+ --max-new-tokens 5 = 305 tokens, more than the "
                                          r"model's context of 256.*fewer than 256"):
        lowbit.generate(model, "a" * 300, max_new_tokens=5, chat=False, engine="lean")
    with pytest.raises(LowbitError, match="251 .*context of 256.*at most 250 tokens, or pass --max-new-tokens 5"):
        lowbit.generate(model, "a" * 251, max_new_tokens=6, chat=False, engine="hf")
    r = run("generate", tiny_dir, "--prompt", "a" * 300, "--raw", "-n", "5")
    assert_clean_failure(r, "300 prompt tokens", "context of 256", "fix:")
    monkeypatch.setattr(decode, "lean_generate", real)
    res = lowbit.generate(model, "a" * 250, max_new_tokens=6, chat=False)  # exactly the context: allowed
    assert 1 <= res.tokens <= 6


def test_check_length_limits():
    cfg = make_tiny_llama().config  # max_position_embeddings 256
    check_length(cfg, 250, 6)
    with pytest.raises(LowbitError, match="251 prompt tokens"):
        check_length(cfg, 251, 6)
    with pytest.raises(LowbitError, match=str(MAX_NEW_TOKENS)):
        check_length(cfg, 1, MAX_NEW_TOKENS + 1)
