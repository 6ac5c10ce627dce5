"""The Python API (issue 11, item 12): igengine.load -> Pipeline gives the numbers of `igengine sample`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import igengine
from igengine.cli import main
from igengine.errors import CheckpointError, IgengineError, JobError
from igengine.jobs.sample import DEFAULT_CHECKPOINT
from igengine.models.checkpoint import load_checkpoint
from igengine.sampling import paper_sampler, resolve_sampler
from tests.bulk_fixtures import save_ldit, save_stats, save_vavae

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="embedded checkpoint missing")

STEPS = 6  # short runs; the defaults themselves are checked without sampling


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`igengine sample` with random labels and seed 3: samples.npz and the latents of indices 0..7."""
    out = tmp_path_factory.mktemp("api") / "run"
    code = main(["sample", "--n", "8", "--seed", "3", "--steps", str(STEPS), "--out", str(out),
                 "--save-latents", str(out.parent / "lat.npy")])
    assert code == 0
    data = np.load(out / "samples.npz")
    return data["arr_0"], data["labels"], np.load(out.parent / "lat.npy")


@pytest.fixture(scope="module")
def pipe():
    return igengine.load(steps=STEPS)


def test_images_equal_the_cli_samples_bit_for_bit(pipe, cli_run):
    pixels, labels, _ = cli_run
    ix = [5, 0, 3]
    assert np.array_equal(pipe.resolve("random", seed=3, indices=range(8))[0].numpy(), labels)
    assert np.array_equal(pipe.images("random", seed=3, indices=ix), pixels[ix])
    assert np.array_equal(pipe.images(labels[[7, 6]], seed=3, indices=[7, 6]), pixels[[7, 6]])


def test_latents_equal_the_cli_latents(pipe, cli_run):
    pixels, labels, latents = cli_run
    got = pipe.sample(labels, seed=3)  # indices 0..7 in one batch, as the CLI ran them: bit for bit
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.equal(got, torch.from_numpy(latents))
    assert np.array_equal(pipe.decode(got), pixels)
    # Another batch composition (batch_size 3): the network's reassociation only.
    small = igengine.load(steps=STEPS, batch_size=3).sample(labels, seed=3)
    assert (small - torch.from_numpy(latents)).abs().max() <= 1e-5


def test_the_checkpoints_own_sampler_defaults_are_used():
    pipe = igengine.load()
    s = pipe.sampler_config
    assert (s.solver.value, s.steps, s.guidance.cfg_scale, s.guidance.ig_scale) == ("sde", 50, 1.35, 1.4)
    assert paper_sampler(pipe.config.family).steps == 250  # what the family's paper settings would give
    loaded = load_checkpoint(DEFAULT_CHECKPOINT)
    assert s == resolve_sampler(loaded.config.family, "reference", loaded.sampler_settings)  # = `igengine sample`
    assert pipe.precision.value == "reference" and pipe.decodes and pipe.num_classes == 10
    assert "precision reference (the default on cpu: the official numerics" in pipe.notes[0]
    assert repr(pipe) == "Pipeline(SiT-digits, sde 50 steps, cfg 1.35, ig 1.4, reference on cpu, decodes)"


def test_overrides_replace_only_what_they_name():
    s = igengine.load(steps=7, cfg_scale=1.0, ig_interval=[0.2, 0.9], precision="fp32").sampler_config
    assert (s.steps, s.guidance.cfg_scale, s.guidance.ig_interval, s.precision.value) == (7, 1.0, (0.2, 0.9), "fp32")
    assert (s.solver.value, s.guidance.ig_scale, s.guidance.cfg_interval) == ("sde", 1.4, (0.0, 0.7))


def test_label_forms(pipe):
    lab, idx = pipe.resolve(7, indices=[4, 2])
    assert lab.tolist() == [7, 7] and idx.tolist() == [4, 2]
    lab, idx = pipe.resolve("balanced", indices=np.array([3, 14]))
    assert lab.tolist() == [3, 4] and idx.tolist() == [3, 14]
    lab, idx = pipe.resolve(torch.tensor([1, 2, 3]))
    assert lab.tolist() == [1, 2, 3] and idx.tolist() == [0, 1, 2]


@pytest.mark.parametrize("call, expect", [
    (lambda p: p.resolve([3, 10]), "`labels` class 10 is outside [0, 10) for SiT-digits"),
    (lambda p: p.resolve([-1]), "`labels` class -1 is outside [0, 10)"),
    (lambda p: p.resolve([1, 2], indices=[0, -4]), "sample `indices` must be >= 0, got -4"),
    (lambda p: p.resolve([1, 2, 3], indices=[0, 1]), "3 `labels` for 2 sample `indices`"),
    (lambda p: p.resolve("random"), "`indices` is needed with `labels` 'random'"),
    (lambda p: p.resolve(4), "`indices` is needed with `labels` 4"),
    (lambda p: p.resolve("0-9", indices=[0]), "`labels` '0-9' is not a label mode"),
    (lambda p: p.resolve([1.5]), "`labels` must be whole numbers"),
    (lambda p: p.resolve(["a"]), "`labels` must be whole numbers"),
    (lambda p: p.resolve([1], indices=[0.5]), "`indices` must be whole numbers"),
    (lambda p: p.resolve([]), "no samples asked for"),
    (lambda p: p.resolve([1], seed=-1), "`seed` must lie in [0, 2^64)"),
    (lambda p: p.decode(torch.zeros(2, 3, 8, 8)), "`latents` must be [N, 1, 8, 8] for SiT-digits"),
])
def test_bad_requests_are_one_line_job_errors(pipe, call, expect):
    with pytest.raises(JobError) as e:
        call(pipe)
    assert expect in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, kind, expect", [
    ({"precision": "fp64"}, JobError, "unknown `precision` 'fp64'; choose one of reference, fp32"),
    ({"backend": "jax"}, JobError, "unknown `backend` 'jax'"),
    ({"solver": "heun2"}, JobError, "heun2"),
    ({"cfg_interval": 0.7}, JobError, "`cfg_interval` must be (LOW, HIGH)"),
    ({"batch_size": 0}, JobError, "`batch_size` must be >= 1"),
    ({"device": "mps"}, JobError, "`device` 'mps' is not supported"),
    ({"ckpt": "no/such.pt"}, CheckpointError, "no/such.pt"),
    ({"latent_stats": "s.pt"}, JobError, "`latent_stats` belongs to a VA-VAE or an RAE decoder: pass the `vae`"),
    ({"vae": "vae.pt"}, JobError, "`vae` / `latent_stats` were given but SiT-digits samples pixels"),
])
def test_bad_load_arguments_are_one_line_errors(kwargs, kind, expect):
    with pytest.raises(kind) as e:
        igengine.load(**kwargs)
    assert isinstance(e.value, IgengineError)
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_latent_model_with_a_vae_gives_the_cli_images(tmp_path, capsys):
    ckpt, vae = save_ldit(tmp_path / "ldit.safetensors"), save_vavae(tmp_path / "v.pt")
    stats = save_stats(tmp_path / "s.pt")
    out = tmp_path / "run"
    code = main(["sample", "--ckpt", str(ckpt), "--vae", str(vae), "--latent-stats", str(stats), "--n", "5",
                 "--steps", "4", "--labels", "2,7", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = np.load(out / "samples.npz")
    pipe = igengine.load(ckpt, vae=vae, latent_stats=stats, steps=4)
    labels = [2, 7, 2, 7, 2]
    assert np.array_equal(pipe.images(labels), data["arr_0"])
    bare = igengine.load(ckpt, steps=4)  # no VAE: latents only
    assert not bare.decodes and tuple(bare.sample([1], indices=[4]).shape) == (1, *bare.config.latent_shape)
    with pytest.raises(JobError, match="loaded without a `vae`"):
        bare.images([1])


def test_import_igengine_stays_light_and_load_is_there():
    code = ("import json, sys, igengine; "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'load': callable(igengine.load), "
            "'api': 'igengine.api' in sys.modules}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"torch": False, "load": True, "api": False}, proc.stderr
