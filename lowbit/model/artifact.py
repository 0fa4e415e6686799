"""lowbit's artifact format, in one place: constants, reader, writer and the atomic folder helpers.

An artifact is a folder a new process loads back to identical logits:

    model.safetensors   QLinear buffers (qdata, scale, ...) and every kept tensor in keep_dtype
    config.json         the transformers config (tie_word_embeddings off when the head is quantized;
                        lowbit.json's "embedding": "lm_head" then says the embedding reads the head's rows)
    tokenizer files     copied through the tokenizer's own save_pretrained
    lowbit.json         format + version, lowbit version, recipe, per-module plan, source identity,
                        and the calibration record (method, data statistics) when one was used
    imatrix.safetensors optional: per-input-channel mean squared activation of each quantized
                        module (an importance matrix), from calibration; the GGUF export uses it

The folder is written under a temporary name beside the target and renamed into place, so an
interrupted run leaves no half-written artifact; every exporter uses the same helpers.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: outputs are written without a lock
    fcntl = None

import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.formats.affine import torch_dtype
from lowbit.model import sources
from lowbit.model.handle import Model
from lowbit.model.qlinear import QEmbedding, QLinear, prepare_model, share_embedding
from lowbit.model.quantize import fits_dtype, plans_from_json, plans_to_json, set_submodule
from lowbit.model.skeleton import empty_model, finish_model, load_tokenizer, put_tensor
from lowbit.model.st_reader import read_header
from lowbit.model.st_writer import Entry, entry_of, write_tensors
from lowbit.recipe import Recipe
from lowbit.version import __version__

ARTIFACT_FILE = sources.ARTIFACT_FILE  # lowbit.json: what makes a folder an artifact
ARTIFACT_FORMAT = "lowbit"
ARTIFACT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
IMATRIX_FILE = "imatrix.safetensors"
MAX_META_BYTES = 64 << 20  # lowbit.json: a table per module, far below this even for the largest models


# -- writing beside the target, atomically ---------------------------------------------------------
# Every output (artifact folder, GGUF file, compressed-tensors folder) is written under a temporary
# name beside its target while the writer holds an exclusive lock on the target (.NAME.lock beside
# it, fcntl.flock), and renamed into place at the end: without --force the rename refuses a target
# that appeared meanwhile, so of two concurrent runs one fails and nothing is replaced.
#
# A temporary's name says which process owns it: .NAME.tmp-PID-HOST-START-RAND, where HOST hashes
# the boot id and the PID namespace (a PID is judged only where it names the same process) and START
# is the owner's start time in clock ticks since boot (a reused PID is not taken for the owner). A
# later run writing beside it removes the temporaries whose owner is verifiably dead (a SIGKILL's
# leftovers); a live process's temporary, or one whose owner cannot be checked, is left alone.
_OWNED = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-([0-9a-f]{8})-(\d+)-[0-9a-f]{8}(?:\..*)?$")
_UNKNOWN_HOST = "00000000"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


@dataclass
class _Held:
    """A writer's lock on one target, held from the checks to the rename."""
    fd: int  # the locked .NAME.lock file (-1: no flock on this system)
    path: Path
    force: bool
    made: list[Path]  # parent folders created for it, removed again if nothing was written
    thread: int = field(default_factory=threading.get_ident)
    pid: int = field(default_factory=os.getpid)
    scoped: int = 0  # open output_lock() blocks; 0: released by move_into_place


_HELD: dict[Path, _Held] = {}
_HELD_GUARD = threading.Lock()


def _proc_start(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22, counting from the state (field 3)
    except (OSError, IndexError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def _host_marker() -> str:
    """8 hex digits naming this boot and PID namespace; _UNKNOWN_HOST where neither can be read."""
    parts = []
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        return _UNKNOWN_HOST
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}-{_host_marker()}-{_proc_start(pid) or 0}"


def _owner_dead(pid: int, host: str, start: int) -> bool:
    """True only when the process that named a temporary is verifiably gone."""
    if pid <= 0 or host == _UNKNOWN_HOST or host != _host_marker():
        return False  # another machine, boot or PID namespace: cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return False
    now = _proc_start(pid)
    return start != 0 and now is not None and now != start  # the PID now names another process


def clean_stale_temps(folder: Path) -> list[Path]:
    """Remove lowbit temporaries in `folder` whose owning process is dead; returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _OWNED.match(name)
        if m is None or not _owner_dead(int(m[1]), m[2], int(m[3])):
            continue
        p = Path(folder) / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def out_target(out: str | Path, what: str = "output folder") -> Path:
    """The absolute target of --out (its folder's links resolved, not its own name), refusing what
    must never be written or replaced: '.', '..', the current folder or one holding it, the home
    folder or one holding it, and a symbolic link."""
    p = Path(out)
    example = "out/model.gguf" if what == "output file" else "out/model"
    if p.name in ("", ".", ".."):
        raise LowbitError(f"{what} {out}: names an existing folder ('.', '..' or a root), not a new output; "
                          f"fix: pass a new name, e.g. --out {example}")
    target = Path(os.path.abspath(p.parent)).resolve() / p.name
    for label, keep in (("the current folder", Path.cwd), ("your home folder", Path.home)):
        try:
            place = keep().resolve()
        except (OSError, RuntimeError):
            continue
        if target == place or target in place.parents:
            raise LowbitError(f"{what} {out}: is {label} or holds it ({place}); replacing it would delete it; "
                              f"fix: pass a new name, e.g. --out {example}")
    if target.is_symlink():
        raise LowbitError(f"{what} {out}: is a symbolic link (to {os.readlink(target)}); lowbit neither writes "
                          f"through a link nor replaces one; fix: pass the real path, or remove the link")
    return target


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" by process {pid}" if pid.isdigit() else ""


def _flock(path: Path) -> int | None:
    """An exclusive lock on path (created), as an open fd; None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:  # a filesystem without flock: write unlocked, as before
            os.close(fd)
            path.unlink(missing_ok=True)
            return -1
        try:
            st, now = os.fstat(fd), os.stat(path)
            same = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked while we waited
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _acquire(target: Path, force: bool, what: str) -> _Held:
    """This thread's lock on target (re-entrant), or a LowbitError when another writer holds it."""
    busy = (f"{what} {target}: another lowbit run is writing it (lock {target.parent / f'.{target.name}.lock'} held"
            f"{{}}); nothing was written or replaced; fix: wait for that run to finish, or choose another --out")
    with _HELD_GUARD:
        held = _HELD.get(target)
        if held is not None:
            if held.thread != threading.get_ident():
                raise LowbitError(busy.format(" by another thread of this process"))
            held.force = held.force and force
            return held
        existing = target.parent
        while not existing.exists():  # the folders up to it are created for the lock
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise LowbitError(f"{what} {target}: {existing} is not a writable folder; fix: choose another --out")
        made = []
        for d in reversed([target.parent, *target.parent.parents]):
            if not d.exists():
                try:
                    d.mkdir()
                except FileExistsError:
                    continue
                except OSError as e:
                    raise LowbitError(f"{what} {target}: cannot create folder {d} ({e.strerror}); "
                                      f"fix: choose another --out") from None
                made.append(d)
        lock = target.parent / f".{target.name}.lock"
        try:
            fd = _flock(lock) if fcntl is not None else -1
        except OSError as e:
            _remove_made(made)
            raise LowbitError(f"{what} {target}: cannot create the lock file {lock} ({e.strerror}); "
                              f"fix: choose another --out") from None
        if fd is None:
            holder = _lock_holder(lock)
            _remove_made(made)
            raise LowbitError(busy.format(holder))
        held = _HELD[target] = _Held(fd, lock, force, made)
        return held


def _remove_made(made: list[Path]) -> None:
    for d in reversed(made):
        try:
            d.rmdir()  # only while empty
        except OSError:
            break


def _release(target: Path, held: _Held) -> None:
    with _HELD_GUARD:
        if _HELD.get(target) is not held:
            return
        del _HELD[target]
    if held.fd >= 0:
        try:
            os.unlink(held.path)  # while still locked, so no other writer holds a lock on a removed file
        except OSError:
            pass
        os.close(held.fd)
    if not os.path.lexists(target):
        _remove_made(held.made)


@atexit.register
def _release_all() -> None:
    for target, held in list(_HELD.items()):
        if held.pid == os.getpid():
            _release(target, held)


if hasattr(os, "register_at_fork"):  # a forked child neither holds nor releases its parent's locks
    os.register_at_fork(after_in_child=_HELD.clear)


@contextlib.contextmanager
def output_lock(out: str | Path, force: bool, what: str = "output folder"):
    """Hold the writer's lock on out for the block (re-entrant within a thread): checks, work and
    rename run under it, and it is released (its lock file removed) however the block ends."""
    target = out_target(out, what)
    held = _acquire(target, force, what)
    held.scoped += 1
    try:
        yield target
    finally:
        held.scoped -= 1
        if held.scoped <= 0:
            _release(target, held)


def _prepare(out: Path, force: bool, what: str, folder: bool) -> Path:
    target = out_target(out, what)
    if os.path.lexists(target):
        if not force:
            raise LowbitError(f"{what} {out}: already exists; fix: choose another --out, or pass --force to replace it")
        if folder and not target.is_dir():
            raise LowbitError(f"{what} {out}: is a file; fix: choose another --out")
        if not folder and target.is_dir():
            raise LowbitError(f"{what} {out}: is a folder; fix: pass a file name ending in .gguf")
    _acquire(target, force, what)  # checks the folder is writable; released by move_into_place, or by the
    # caller's output_lock block
    clean_stale_temps(target.parent)
    return target


def prepare_out_dir(out: Path, force: bool) -> None:
    """Refuse to clobber an existing folder unless forced, and the paths out_target refuses; fail early
    on an unwritable parent; take the writer's lock on out and remove dead runs' temporaries beside it."""
    _prepare(Path(out), force, "output folder", folder=True)


def prepare_out_file(out: Path, force: bool) -> Path:
    """prepare_out_dir for a single-file output (a GGUF file); returns the absolute target."""
    return _prepare(Path(out), force, "output file", folder=False)


def temp_beside(out: Path, suffix: str = "") -> Path:
    """A fresh hidden path in out's folder (same filesystem, so renaming it into place is atomic),
    named after this process so that a later run can tell when it was left by a dead one."""
    target = out_target(out)
    return target.parent / f".{target.name}.tmp-{_owner_tag()}-{uuid.uuid4().hex[:8]}{suffix}"


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the system or the filesystem lacks it."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(e, os.strerror(e), str(dst))


def move_into_place(tmp: Path, out: Path, force: bool | None = None) -> None:
    """Rename a finished temporary to out, under the writer's lock. Right before the rename out is
    checked again: one that appeared meanwhile is replaced only with force (default: the force the
    lock was taken with, else True); an existing out is swapped out only now, atomically where the
    system allows (renameat2 RENAME_EXCHANGE). Releases a lock prepare_out_dir took outside an
    output_lock block."""
    target = out_target(out, "output file" if not Path(tmp).is_dir() else "output folder")
    held = _HELD.get(target)
    if force is None:
        force = held.force if held is not None else True
    try:
        exists = os.path.lexists(target)
        if exists and not force:
            raise LowbitError(f"output {out}: appeared while this run was writing it (another process wrote it); "
                              f"nothing was replaced; fix: choose another --out, or pass --force to replace it")
        if not exists:
            try:
                done = _rename2(tmp, target, _RENAME_NOREPLACE)
            except FileExistsError:
                raise LowbitError(f"output {out}: appeared while this run was writing it (another process wrote "
                                  f"it); nothing was replaced; fix: choose another --out, or pass --force") from None
            if not done:
                os.rename(tmp, target)
        elif Path(tmp).is_dir() != target.is_dir():
            raise LowbitError(f"output {out}: is a {'folder' if target.is_dir() else 'file'} now; nothing was "
                              f"replaced; fix: choose another --out")
        elif not target.is_dir():
            os.replace(tmp, target)  # a file: atomic
        elif _rename2(tmp, target, _RENAME_EXCHANGE):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = target.parent / f".{target.name}.old-{_owner_tag()}-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if held is not None and held.scoped <= 0:
            _release(target, held)


def artifact_entries(model: torch.nn.Module, keep_dtype: str) -> list[Entry]:
    """Tensors to store, as the state dict names them: QLinear buffers as they are (codes a kernel
    holds in its own layout are rebuilt one module at a time, when written), other floats in
    keep_dtype (a tensor that would overflow it stays as it is), tied copies once."""
    dt = torch_dtype(keep_dtype)
    entries, seen = [], set()

    def add(name: str, t: torch.Tensor, in_qlinear: bool) -> None:
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen:
            return
        seen.add(key)
        if in_qlinear or not t.is_floating_point() or t.dtype == dt:
            entries.append(entry_of(name, t))
            return
        entries.append(Entry(name, dt, tuple(t.shape), lambda: t) if fits_dtype(t, dt) else entry_of(name, t))

    for mname, mod in model.named_modules():
        prefix = mname + "." if mname else ""
        for n, p in mod.named_parameters(recurse=False):
            add(prefix + n, p.detach(), isinstance(mod, QLinear) and n != "bias")
        for n, b in mod.named_buffers(recurse=False):
            if b is not None and n not in mod._non_persistent_buffers_set:
                add(prefix + n, b, isinstance(mod, QLinear))
        if isinstance(mod, QLinear) and "qdata" in mod._names and "qdata" not in mod._buffers:
            shape, dtype = mod.stored_meta("qdata")
            entries.append(Entry(prefix + "qdata", dtype, shape, lambda m=mod: m._stored("qdata")))
    return entries


def save_artifact(model: Model, out: str | Path, force: bool = False) -> Path:
    """Write a quantized model as an artifact folder (atomically); refuses a model without a
    quantization plan or a tokenizer, since the folder could not be loaded back."""
    out = Path(out)
    if model.recipe is None or model.plan is None:
        raise LowbitError("save: the model has not been quantized by lowbit (no recipe); call lowbit.quantize first")
    tokenizer = model.need_tokenizer("save")
    module = model.module
    with output_lock(out, force):  # released however this ends, a failure included
        prepare_out_dir(out, force)
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(out)
        tmp.mkdir()
        try:
            write_tensors(tmp / WEIGHTS_FILE, artifact_entries(module, model.recipe.keep_dtype), metadata={"format": "pt"})
            if model.imatrix:
                save_file({k: v.float().contiguous() for k, v in model.imatrix.items()}, str(tmp / IMATRIX_FILE),
                          metadata={"what": "mean of x**2 per input channel, keyed by module name"})
            module.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            meta = {
                "format": ARTIFACT_FORMAT,
                "format_version": ARTIFACT_FORMAT_VERSION,
                "lowbit_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": model.source,
                "recipe": model.recipe.to_dict(),
                "modules": plans_to_json(model.plan),
            }
            if isinstance(module.get_input_embeddings(), QEmbedding):
                meta["embedding"] = "lm_head"  # embeddings read from the quantized head's rows
            if model.calibration:
                meta["calibration"] = model.calibration
            meta["files"] = {name: sources.sha256_files([tmp / name]) for name in (WEIGHTS_FILE, IMATRIX_FILE)
                             if (tmp / name).is_file()}  # checked on every load: a swapped or edited file is refused
            (tmp / ARTIFACT_FILE).write_text(json.dumps(meta, indent=1))
            move_into_place(tmp, out)
            for name, digest in meta["files"].items():  # `lowbit info` / load right after: no second read
                sources.remember_hash(out / name, digest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- reading ---------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_meta(folder: Path) -> dict:
    """lowbit.json, checked field by field: the format, a version this lowbit reads, the recipe, and a
    modules table whose entries have the types the loader relies on."""
    meta_path = folder / ARTIFACT_FILE
    try:
        raw = meta_path.read_bytes()[: MAX_META_BYTES + 1]
        if len(raw) > MAX_META_BYTES:
            raise ValueError(f"it is larger than {MAX_META_BYTES} bytes")
        meta = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as e:
        raise LowbitError(f"artifact file {meta_path}: cannot be read as JSON ({e}); the artifact is damaged; quantize again") from None

    def bad(field: str, why: str) -> LowbitError:
        return LowbitError(f"artifact file {meta_path}: field '{field}' {why}; the artifact is damaged or was edited; "
                           f"fix: quantize again")

    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT or not isinstance(meta.get("modules"), dict):
        raise LowbitError(f"artifact file {meta_path}: field 'format' must be '{ARTIFACT_FORMAT}' with a 'modules' table; "
                          f"this is not a lowbit artifact")
    version = meta.get("format_version", 0)
    if not _is_int(version) or version < 0:
        raise bad("format_version", f"must be a whole number, not {version!r}")
    if version > ARTIFACT_FORMAT_VERSION:
        raise LowbitError(f"artifact file {meta_path}: field 'format_version' is {version}, newer than this "
                          f"lowbit reads ({ARTIFACT_FORMAT_VERSION}); fix: upgrade lowbit")
    if not meta["modules"]:
        raise bad("modules", "is empty")
    for name, d in meta["modules"].items():
        where = f"modules.{name}"
        if not isinstance(d, dict):
            raise bad(where, "must be a table")
        for k in ("in_features", "out_features"):
            if not _is_int(d.get(k)) or d[k] <= 0:
                raise bad(f"{where}.{k}", f"must be a positive whole number, not {d.get(k)!r}")
        if d.get("spec") is not None and not isinstance(d["spec"], dict):
            raise bad(f"{where}.spec", "must be a table or null")
        if not isinstance(d.get("note", ""), str):
            raise bad(f"{where}.note", "must be text")
    for k, kind in (("recipe", dict), ("source", dict), ("calibration", dict), ("files", dict)):
        if k in meta and meta[k] is not None and not isinstance(meta[k], kind):
            raise bad(k, f"must be a {'table' if kind is dict else kind.__name__}")
    if not isinstance(meta.get("recipe"), dict):
        raise bad("recipe", "is missing")
    if meta.get("embedding") not in (None, "lm_head"):
        raise bad("embedding", f"must be 'lm_head' or absent, not {meta['embedding']!r}")
    for fname, digest in (meta.get("files") or {}).items():
        if fname not in (WEIGHTS_FILE, IMATRIX_FILE) or not (isinstance(digest, str) and len(digest) == 64):
            raise bad(f"files.{fname}", "must name an artifact file and its sha256")
    return meta


def check_files(folder: Path, meta: dict) -> None:
    """The weights files are the ones lowbit.json recorded (sha256, remembered per size and mtime);
    artifacts written before the hashes were recorded are read as they are."""
    for fname, digest in (meta.get("files") or {}).items():
        path = folder / fname
        if not path.is_file():
            raise LowbitError(f"artifact {folder}: {fname} is missing; the artifact is incomplete; quantize again")
        if sources.sha256_memo([path]) != digest:
            raise LowbitError(f"artifact file {path}: its contents differ from the sha256 recorded in {ARTIFACT_FILE} "
                              f"(field 'files'); the file was replaced, edited or damaged; fix: restore the artifact "
                              f"or quantize again")


def check_tensors(weights: Path, plans, header: dict) -> None:
    """Each quantized module's tensors are the ones its spec stores, with their shapes and dtypes
    (formats.qtensor.stored_layout), before any is read: a changed spec or a swapped file is refused."""
    from lowbit.formats.qtensor import stored_layout
    from lowbit.model.st_reader import DTYPES

    for p in plans:
        if p.spec is None:
            continue
        need, optional = stored_layout(p.spec, p.out_features, p.in_features)
        prefix = p.name + "."
        have = {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        have.pop("bias", None)
        for n, (shape, dtype) in {**need, **{k: v for k, v in optional.items() if k in have}}.items():
            info = have.get(n)
            if info is None:
                raise LowbitError(f"artifact {weights}: tensor {prefix}{n} of module {p.name} ({p.spec.label}) is "
                                  f"missing; the artifact is damaged; quantize again")
            got = (tuple(info.get("shape", ())), DTYPES.get(info.get("dtype")))
            if got != (tuple(shape), dtype):
                raise LowbitError(f"artifact {weights}: tensor {prefix}{n} is {got[1]} {got[0]}, but module {p.name}'s "
                                  f"spec ({p.spec.label}, {p.out_features}x{p.in_features}) stores {dtype} {tuple(shape)}; "
                                  f"the spec in {ARTIFACT_FILE} and the weights disagree; quantize again")
        extra = set(have) - set(need) - set(optional)
        if extra:
            raise LowbitError(f"artifact {weights}: module {p.name} has tensors its spec ({p.spec.label}) does not "
                              f"store: {', '.join(sorted(extra))}; the artifact is damaged; quantize again")


def load_artifact(folder: Path, dtype: torch.dtype = torch.float32) -> Model:
    """An artifact folder as a quantized model on its CPU kernels (with the KV-cache format its recipe chose)."""
    from safetensors import safe_open

    folder = Path(folder)
    meta = read_meta(folder)
    meta_path = folder / ARTIFACT_FILE
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise LowbitError(f"artifact {folder}: {WEIGHTS_FILE} is missing; the artifact is incomplete; quantize again")
    sources.check_safetensors(weights)
    check_files(folder, meta)
    plans = plans_from_json(meta["modules"])
    check_tensors(weights, plans, read_header(weights)[1])
    model = empty_model(folder, dtype)
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        for p in plans:
            if p.spec is None:
                continue
            prefix = p.name + "."
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix) and k != prefix + "bias"}
            bias = f.get_tensor(prefix + "bias").to(dtype) if prefix + "bias" in keys else None
            if "qdata" not in tensors:
                raise LowbitError(f"artifact {weights}: tensors of module {p.name} are missing; the artifact is damaged; quantize again")
            try:
                old = model.get_submodule(p.name)
            except AttributeError:
                old = None
            if not isinstance(old, torch.nn.Linear) or (old.out_features, old.in_features) != (p.out_features, p.in_features):
                raise LowbitError(f"artifact file {meta_path}: module {p.name} ({p.out_features}x{p.in_features}) is "
                                  f"not a Linear of that shape in the model config.json describes; the artifact is "
                                  f"damaged; quantize again")
            set_submodule(model, p.name, QLinear(p.in_features, p.out_features, p.spec, tensors, bias))
            keys -= {prefix + n for n in tensors} | {prefix + "bias"}
        if meta.get("embedding") == "lm_head" and not share_embedding(model):
            raise LowbitError(f"artifact file {meta_path}: field 'embedding' says the embeddings are the head's rows, "
                              f"but the head is not a per-row INT8/FP8 module; the artifact is damaged; quantize again")
        for k in keys:
            t = f.get_tensor(k)
            put_tensor(model, k, t.to(dtype) if t.is_floating_point() else t, weights)
    recipe = Recipe.from_dict(meta["recipe"], f"artifact file {meta_path}: field 'recipe'")
    prepare_model(model)
    imatrix = None
    if (folder / IMATRIX_FILE).is_file():
        from safetensors.torch import load_file

        sources.check_safetensors(folder / IMATRIX_FILE)
        imatrix = load_file(str(folder / IMATRIX_FILE))
    loaded = Model(finish_model(model, weights), load_tokenizer(folder), meta.get("source", {}), folder, meta,
                   plan=plans, recipe=recipe, imatrix=imatrix, calibration=meta.get("calibration") or None)
    if recipe.kv_cache != "none":  # the recipe chose the KV-cache format this artifact runs with
        loaded.kv_cache = recipe.kv_cache
    return loaded
