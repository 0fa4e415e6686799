import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.spec import QuantSpec


def test_spec_is_frozen_and_round_trips():
    s = QuantSpec(kind="int", bits=4, granularity="group", group_size=64, symmetric=False)
    with pytest.raises(Exception):
        s.bits = 3  # type: ignore[misc]
    assert QuantSpec.from_dict(s.to_dict()) == s
    assert s.to_dict()["version"] == 1
    assert s.label == "int4 asym g64"


@pytest.mark.parametrize("fields, word", [
    (dict(kind="int", bits=9), "bits"),
    (dict(kind="int", bits=1), "bits"),
    (dict(kind="int4"), "kind"),
    (dict(kind="int", granularity="group"), "group_size"),
    (dict(kind="int", granularity="channel", group_size=32), "group_size"),
    (dict(kind="nf4", bits=4, granularity="channel"), "granularity"),
    (dict(kind="fp8_e4m3", bits=4), "bits"),
    (dict(kind="int", bits=4, activation="int8_dynamic"), "activation"),
    (dict(kind="int", bits=8, double_quant=True), "double_quant"),
])
def test_invalid_specs_name_the_field(fields, word):
    with pytest.raises(LowbitError, match=word):
        QuantSpec(**fields)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(LowbitError, match="unknown field.*bitz"):
        QuantSpec.from_dict({"kind": "int", "bitz": 4})


def test_every_kind_has_a_codec():
    from lowbit.formats.qtensor import CODECS
    from lowbit.formats.spec import KINDS

    assert set(CODECS) == set(KINDS)


@pytest.mark.parametrize("spec", [
    QuantSpec(kind="int", bits=8, granularity="channel"),
    QuantSpec(kind="int", bits=8, granularity="tensor", symmetric=False),
    QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False, scale_dtype="float16"),
    QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False, zero_domain="float",
              scale_dtype="float16"),
    QuantSpec(kind="int", bits=3, granularity="group", group_size=64),
    QuantSpec(kind="int", bits=5, granularity="channel", symmetric=False),
    QuantSpec(kind="nf4", bits=4, granularity="group", group_size=64, double_quant=True),
    QuantSpec(kind="nf4", bits=4, granularity="group", group_size=32),
    QuantSpec(kind="fp8_e4m3", bits=8, granularity="channel"),
    QuantSpec(kind="fp8_e5m2", bits=8, granularity="group", group_size=64),
], ids=lambda s: s.label)
@pytest.mark.parametrize("rows,cols", [(3, 192), (300, 128)])
def test_stored_layout_is_what_quantize_tensor_stores(spec, rows, cols):
    from lowbit.formats.qtensor import quantize_tensor, stored_layout

    need, optional = stored_layout(spec, rows, cols)
    qt = quantize_tensor(torch.randn(rows, cols), spec)
    assert {n: (tuple(t.shape), t.dtype) for n, t in qt.tensors.items()} == need
    assert set(optional) <= {"perm"}
