"""The `openai` client example of docs/serve.md (and the README's, once it has one) runs as shown,
against a real server on a free loopback port."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lowbit.serve import ServeConfig
from tests.serve.conftest import Scripted
from tests.serve.test_uvicorn import served

ROOT = Path(__file__).resolve().parents[2]
BASE = "http://127.0.0.1:8000/v1"


def client_block(doc: Path) -> str | None:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S) if f'OpenAI(base_url="{BASE}"' in b]
    return blocks[0] if blocks else None


@pytest.mark.parametrize("doc", ["docs/serve.md", "README.md"])
def test_openai_client_example_runs(doc, capsys):
    code = client_block(ROOT / doc)
    if code is None:
        pytest.skip(f"{doc} has no `openai` client example")
    cfg = ServeConfig(candidate=Scripted('{"city": "Paris"', "smollm2-w4"), fallback=Scripted('{"city": "Paris"}', "fp32"),
                      canary=100, api_key="my-key-123")
    with served(cfg) as (base, app):
        exec(compile(code.replace(BASE, base), doc, "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fp32 json_invalid"  # the candidate's JSON was cut off: the fallback answered
    assert out[1] == '{"city": "Paris"}'
    assert out[2] == '{"city": "Paris"'  # streamed, no JSON asked: the candidate's own text, unchecked
