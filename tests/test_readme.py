"""The Python examples in README.md run as written."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_example_runs(i, monkeypatch):
    monkeypatch.chdir(README.parent)
    scope: dict = {}
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), scope)
    if "latents" in scope:  # the sampler examples: 4 digits of the embedded model's shape
        assert tuple(scope["latents"].shape) == (4, 1, 8, 8) and scope["latents"].abs().max() > 0.1
    if "pipe" in scope:  # the Python API: the checkpoint's own defaults, not the paper's 250 steps
        pipe = scope["pipe"]
        assert pipe.sampler_config.steps == 50 and pipe.config.name == "SiT-digits"
    if "images" in scope:
        images = scope["images"]
        assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 3) and images.std() > 10
        assert np.array_equal(scope["alone"][0], images[3])  # what the README says
    if "my_net" in scope:  # a Sampler of the pipeline's parts gives the pipeline's numbers
        assert torch.equal(scope["latents"], scope["pipe"].sample([0, 1, 2, 3]))
