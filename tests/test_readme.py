"""The README's promises: the two set-up commands come first, and the first example runs as shown."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```sh\n(.*?)```", README, re.S).group(1)
    commands = [ln.split("#")[0].strip() for ln in first_block.splitlines() if ln.strip()]
    assert commands == ["make demo", "make test"]
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_first_python_example_runs_as_documented():
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    scope: dict = {}
    exec(code, scope)
    assert scope["q"].reshape(-1).tolist() == [-127, -48, 11, 101]
    assert round(scope["scale"].item(), 5) == 0.00945
    assert [round(v, 4) for v in scope["w_hat"].reshape(-1).tolist()] == [-1.2, -0.4535, 0.1039, 0.9543]
