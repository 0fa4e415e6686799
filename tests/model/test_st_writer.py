"""The streaming safetensors writer and the artifact's tensor list built on it."""

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.model.artifact import artifact_entries
from lowbit.formats import QuantSpec
from lowbit.model import st_writer
from lowbit.model.load import load_model
from lowbit.model.qlinear import QLinear
from lowbit.model.st_reader import iter_tensors
from lowbit.model.st_writer import Entry, entry_of, write_tensors


def test_written_file_reads_back_through_safetensors_and_our_reader(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, 2, generator=g).half(),
        "i8": torch.randint(-128, 127, (4, 3), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g),
        "i64": torch.arange(5),
        "flag": torch.tensor([True, False, True]),
        "fp8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
        "strided": torch.randn(6, 4, generator=g).t(),  # not contiguous: written in logical order
    }
    path = tmp_path / "x.safetensors"
    n = write_tensors(path, [entry_of(k, v) for k, v in tensors.items()], metadata={"format": "pt"})
    assert n == path.stat().st_size
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.view(torch.uint8), v.contiguous().view(torch.uint8)) if v.numel() and v.dim() else torch.equal(got.float(), v.float())
    ours = dict(iter_tensors(path))
    assert torch.equal(ours["strided"], tensors["strided"]) and torch.equal(ours["bf16"], tensors["bf16"])


def test_entries_are_made_one_at_a_time_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(st_writer, "SYNC_BYTES", 64)  # exercise the flush-and-drop path on a small file
    alive, made = [], []

    def maker(i):
        def make():
            assert not alive, "an earlier entry's tensor is still held"
            t = torch.full((16,), float(i))
            made.append(i)
            alive.append(t)
            return t
        return make

    entries = [Entry(f"t{i}", torch.float32, (16,), maker(i)) for i in range(4)]
    orig = st_writer._drop_cache

    def drop_and_release(f):
        alive.clear()
        orig(f)

    monkeypatch.setattr(st_writer, "_drop_cache", drop_and_release)
    write_tensors(tmp_path / "y.safetensors", entries)
    assert made == [0, 1, 2, 3]
    with safe_open(str(tmp_path / "y.safetensors"), "pt") as f:
        assert [f.get_tensor(f"t{i}")[0].item() for i in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_a_made_tensor_that_differs_from_its_declaration_is_refused(tmp_path):
    with pytest.raises(ValueError, match="declared torch.float32 \\[2\\], made torch.float32 \\[3\\]"):
        write_tensors(tmp_path / "z.safetensors", [Entry("w", torch.float32, (2,), lambda: torch.zeros(3))])
    with pytest.raises(ValueError, match="listed twice"):
        write_tensors(tmp_path / "z.safetensors", [entry_of("w", torch.zeros(1)), entry_of("w", torch.zeros(1))])


@pytest.mark.parametrize("spec", [
    QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=True),
    QuantSpec(kind="int", bits=4, granularity="group", group_size=64, symmetric=False),
    QuantSpec(kind="int", bits=8, granularity="channel", activation="int8_dynamic"),
])
def test_stored_meta_matches_the_codes_a_kernel_gives_back(spec):
    q = QLinear.from_weight(torch.randn(64, 128), spec)
    q.prepare("auto")
    assert "qdata" not in q._buffers, f"{q.plan.name} should hold the codes itself"
    codes = q._stored("qdata")
    assert q.stored_meta("qdata") == (tuple(codes.shape), codes.dtype)


def test_saving_a_kernel_packed_model_rebuilds_codes_only_when_written(tiny_dir, ids, tmp_path, monkeypatch):
    loaded = load_model(tiny_dir)
    lowbit.quantize(loaded, "w4-g32")
    assert any(isinstance(m, QLinear) and "qdata" not in m._buffers for m in loaded.module.modules())
    calls = []
    real = QLinear._stored
    monkeypatch.setattr(QLinear, "_stored", lambda self, name: calls.append(name) or real(self, name))
    entries = artifact_entries(loaded.module, "float16")
    assert calls == []  # listing the tensors rebuilt no codes
    with torch.no_grad():
        before = loaded.module(ids).logits
    lowbit.save(loaded, tmp_path / "art")
    assert calls.count("qdata") == sum(e.name.endswith("qdata") and isinstance(
        loaded.module.get_submodule(e.name.rpartition(".")[0]), QLinear)
        and "qdata" not in loaded.module.get_submodule(e.name.rpartition(".")[0])._buffers for e in entries)
    with torch.no_grad():
        after = lowbit.load(tmp_path / "art")(ids).logits
    assert torch.equal(before, after)


def test_fits_dtype_looks_at_every_chunk(monkeypatch):
    from lowbit.model import quantize as q

    monkeypatch.setattr(q, "CHUNK", 10)
    t = torch.zeros(35)
    assert q.fits_dtype(t, torch.float16)
    t[33] = 1e6  # past float16's range, in the last chunk
    assert not q.fits_dtype(t, torch.float16)
    t[2] = float("nan")  # already not finite: storing it in float16 loses nothing more
    assert q.fits_dtype(t, torch.float16)


def test_a_kept_tensor_that_overflows_float16_is_stored_as_it_is(tiny_dir, ids, tmp_path):
    loaded = load_model(tiny_dir)
    norm = loaded.module.model.norm.weight
    with torch.no_grad():
        norm[0] = 1e6
    lowbit.quantize(loaded, "w4-g32")
    assert norm[0].item() == 1e6 and norm[1].item() == float(norm[1].half())  # the others went through float16
    lowbit.save(loaded, tmp_path / "art")
    with safe_open(str(tmp_path / "art" / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("model.norm.weight")
        assert stored.dtype == torch.float32 and stored[0].item() == 1e6
        assert f.get_tensor("model.layers.0.input_layernorm.weight").dtype == torch.float16


def test_a_wider_float_is_cast_to_its_declared_dtype_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(st_writer, "CAST_CHUNK", 7)
    t = torch.randn(5, 9)
    write_tensors(tmp_path / "c.safetensors", [Entry("w", torch.bfloat16, (5, 9), lambda: t)])
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("w"), t.bfloat16())
    with pytest.raises(ValueError, match="declared torch.int8"):
        write_tensors(tmp_path / "d.safetensors", [Entry("w", torch.int8, (5, 9), lambda: t)])


def test_every_tensor_starts_at_a_multiple_of_its_element_size(tmp_path):
    import json
    import struct

    entries = [entry_of("odd", torch.zeros(3, dtype=torch.uint8)), entry_of("half", torch.zeros(5, dtype=torch.float16)),
               entry_of("perm", torch.arange(7)), entry_of("w", torch.ones(3))]
    write_tensors(tmp_path / "a.safetensors", entries)
    raw = (tmp_path / "a.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    size = {"U8": 1, "F16": 2, "I64": 8, "F32": 4}
    assert all(v["data_offsets"][0] % size[v["dtype"]] == 0 for v in header.values())
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("perm"), torch.arange(7)) and torch.equal(f.get_tensor("odd"), torch.zeros(3, dtype=torch.uint8))
