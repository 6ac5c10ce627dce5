"""The Python examples in README.md run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_example_runs(i, monkeypatch):
    monkeypatch.chdir(README.parent)
    scope: dict = {}
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), scope)
    if "latents" in scope:  # the sampler example: 4 digits of the embedded model's shape
        assert tuple(scope["latents"].shape) == (4, 1, 8, 8) and scope["latents"].abs().max() > 0.1
