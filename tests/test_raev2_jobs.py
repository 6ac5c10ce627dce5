"""RAEv2 through `igengine sample`: its checkpoints (official training dict and igengine safetensors), the RAE
decoder from decoder.pt + stats.pt, determinism across batch sizes, resume, torchrun, the manifest, and the
bad inputs of the issue (each one line, exit 2, nothing written).

A tiny RAEv2 (8-channel 4x4 latents, trunk 32 x 3, head 32 x 2, base depth 2) with every parameter random,
and a one-layer RAE decoder of the official ViT-B width (768, so that the loader's width table gives its
heads in a torchrun worker too) with patch 4: 16x16 images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from igengine.cli import main
from igengine.config import Family, ModelConfig
from igengine.errors import CheckpointError
from igengine.models import build_model
from igengine.models.checkpoint import load_checkpoint, save_safetensors
from igengine.vae import ViTMAEDecoder, ViTMAEDecoderConfig
from tests.bulk_fixtures import run_torchrun
from tests.conftest import randomize_, tiny_model

TINY = ModelConfig(family=Family.RAEV2, name="RAEv2-tiny", input_size=4, patch_size=1, in_channels=8, hidden_size=32,
                   depth=3, num_heads=2, encoder_depth=2, num_classes=10, decoder_hidden_size=32, head_depth=2,
                   head_num_heads=2, time_tokens=4, class_tokens=8, use_swiglu=True, use_rope=True, use_rmsnorm=True,
                   qk_norm=True)
DECODER = ViTMAEDecoderConfig(latent_channels=8, width=768, depth=1, num_heads=12, mlp_width=3072, grid=4,
                              patch_size=4)


def tiny_raev2(seed: int = 0):
    return randomize_(build_model(TINY), seed, scale=0.1)


def save_official(path: Path, model) -> Path:
    """The official training dict (src/utils/checkpoint.py): step, epoch, model, ema, optimizer, scheduler."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"step": 10, "epoch": 1, "model": {k: v + 1 for k, v in sd.items()}, "ema": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]},
                "scheduler": {"last_epoch": 1, "base_lrs": [2e-4]}}, path)
    return path


def save_decoder(path: Path, cfg: ViTMAEDecoderConfig = DECODER, seed: int = 0) -> Path:
    net = ViTMAEDecoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "decoder_pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in name and "weight" in name else 0.0))
    torch.save(net.state_dict(), path)
    return path


def save_stats(path: Path, shape=(8, 4, 4), seed: int = 1) -> Path:
    g = torch.Generator().manual_seed(seed)
    torch.save({"mean": 0.3 * torch.randn(shape, generator=g), "var": 0.5 + torch.rand(shape, generator=g)}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("raev2")
    model = tiny_raev2()
    save_safetensors(model, d / "tiny.safetensors")
    return {
        "official": save_official(d / "checkpoint.pt", model),
        "safetensors": d / "tiny.safetensors",
        "decoder": save_decoder(d / "decoder.pt"),
        "stats": save_stats(d / "stats.pt"),
        "dir": d,
    }


def sample_args(files, out, *extra, batch=3, n=5, ckpt="official"):
    args = ["sample", "--ckpt", files[ckpt], "--vae", files["decoder"], "--latent-stats", files["stats"],
            "--n", n, "--batch-size", batch, "--steps", 6, "--labels", "balanced", "--chunk-size", 4, "--out", out,
            "--no-grid"]
    if ckpt == "official":
        args += ["--encoder-depth", 2]
    return [str(a) for a in (*args, *extra)]


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def load(out: Path):
    with np.load(out / "samples.npz") as z:
        return z["arr_0"], z["labels"]


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("igengine: warning")]
    assert len(lines) == 1 and lines[0].startswith("igengine: error:") and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def test_official_training_dict_loads_its_ema_and_needs_the_base_depth(files):
    with pytest.raises(CheckpointError, match="encoder_depth"):
        load_checkpoint(files["official"])  # a shape no preset has, and the file records no base depth
    loaded = load_checkpoint(files["official"], overrides={"encoder_depth": 2})
    assert loaded.weights == "ema" and loaded.config.family == Family.RAEV2
    for key in ("hidden_size", "depth", "num_heads", "decoder_hidden_size", "head_depth", "head_num_heads",
                "time_tokens", "class_tokens", "num_classes", "in_channels", "input_size", "encoder_depth"):
        assert getattr(loaded.config, key) == getattr(TINY, key), key
    ema = tiny_raev2().state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in ema.items())  # 'ema', not 'model'


def test_safetensors_records_its_config(files):
    loaded = load_checkpoint(files["safetensors"])
    assert loaded.config.name == "RAEv2-tiny" and loaded.config.encoder_depth == 2


def test_an_ig_less_ddt_model_is_refused(files, tmp_path):
    sd = {k: v for k, v in tiny_raev2().state_dict().items() if not k.startswith("base_final_layer")}
    torch.save({"ema": sd}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="base_final_layer"):
        load_checkpoint(tmp_path / "plain.pt", overrides={"encoder_depth": 2})


@pytest.mark.parametrize("model", ["SiT-XL/2", "LightningDiT-XL/1", "RAEv2-XL"])
def test_a_model_of_another_family_or_shape_is_refused_on_a_raev2_checkpoint(files, tmp_path, capsys, model):
    out = tmp_path / "out"
    code, _, err = run(capsys, *sample_args(files, out, "--model", model))
    line = one_line(err)
    assert code == 2 and not out.exists()
    assert ("RAEv2 DiT-DDT" in line) if model != "RAEv2-XL" else ("does not fit" in line and "hidden_size" in line)


def test_a_raev2_model_is_refused_on_a_sit_or_lightningdit_checkpoint(tmp_path, capsys):
    for family in ("sit", "lightningdit"):
        path = tmp_path / f"{family}.safetensors"
        save_safetensors(tiny_model(family), path)
        out = tmp_path / f"out-{family}"
        code, _, err = run(capsys, "sample", "--ckpt", path, "--model", "RAEv2-B", "--n", 2, "--no-decode",
                           "--out", out)
        line = one_line(err)
        assert code == 2 and "is a RAEv2 model but" in line and not out.exists()


# ----------------------------------------------------------------------------------------------
# Decoder inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["stats-shape", "stats-missing", "decoder-width", "kind"])
def test_bad_decoder_inputs_are_one_line_and_write_nothing(files, tmp_path, capsys, case):
    d = tmp_path
    args = sample_args(files, d / "out")
    if case == "stats-shape":
        args[args.index("--latent-stats") + 1] = str(save_stats(d / "s.pt", shape=(8, 2, 2)))
        expect = "expected float [8, 4, 4]"
    elif case == "stats-missing":
        args[args.index("--latent-stats") + 1] = str(d / "nowhere" / "stats.pt")
        expect = "not found"
    elif case == "decoder-width":
        other = ViTMAEDecoderConfig(**{**DECODER.to_dict(), "latent_channels": 16})
        args[args.index("--vae") + 1] = str(save_decoder(d / "wide.pt", other))
        expect = "decoder of another width"
    else:
        args += ["--vae-kind", "vavae"]
        expect = "does not decode"
    code, _, err = run(capsys, *args)
    assert code == 2 and expect in one_line(err)
    assert not (d / "out").exists()


def test_a_missing_stats_flag_is_refused(files, tmp_path, capsys):
    args = sample_args(files, tmp_path / "out")
    i = args.index("--latent-stats")
    del args[i:i + 2]
    code, _, err = run(capsys, *args)
    assert code == 2 and "latent_stats" in one_line(err).replace("--latent-stats", "latent_stats")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(sample_args(files, out, batch=5)) == 0
    return out


def test_manifest_records_the_family(reference):
    m = json.loads((reference / "manifest.json").read_text())
    assert m["model"]["family"] == "raev2" and m["model"]["encoder_depth"] == 2
    assert m["sampler"]["solver"] == "euler" and m["sampler"]["timestep_shift"] == pytest.approx(np.sqrt(128 / 4096))
    assert m["sampler"]["guidance"]["ig_scale"] == 1.78 and m["sampler"]["guidance"]["ig_interval"] == [0.1, 1.0]
    assert m["sampler"]["time_convention"].startswith("t=1 noise") and "x-prediction" in m["sampler"]["time_convention"]
    assert m["vae"]["kind"] == "rae" and m["outputs"]["pixel_conversion"].startswith("uint8(255 * clamp(x, 0, 1))")
    assert m["checkpoint"]["weights"] == "ema"
    pixels, labels = load(reference)
    assert pixels.shape == (5, 16, 16, 3) and labels.tolist() == [0, 1, 2, 3, 4]
    assert len(np.unique(pixels)) > 20  # a decoded image, not a constant


def test_batch_size_does_not_change_the_samples(files, reference, tmp_path, capsys):
    code, _, err = run(capsys, *sample_args(files, tmp_path / "b2", batch=2))
    assert code == 0, err
    a, b = load(reference), load(tmp_path / "b2")
    assert np.array_equal(a[1], b[1])
    assert np.abs(a[0].astype(int) - b[0].astype(int)).max() <= 1  # a uint8 on a rounding boundary may flip


def test_growing_n_resumes_and_matches_one_run(files, reference, tmp_path, capsys):
    out = tmp_path / "grow"
    assert run(capsys, *sample_args(files, out, n=3, batch=5))[0] == 0
    code, _, err = run(capsys, *sample_args(files, out, n=5, batch=5))
    assert code == 0, err
    assert all(np.array_equal(x, y) for x, y in zip(load(out), load(reference)))


def test_cfg_with_an_unconditional_ig_scale_changes_the_samples(files, reference, tmp_path, capsys):
    a = tmp_path / "cfg"
    b = tmp_path / "cfg-u"
    assert run(capsys, *sample_args(files, a, "--cfg-scale", "1.5", batch=5))[0] == 0
    assert run(capsys, *sample_args(files, b, "--cfg-scale", "1.5", "--ig-scale-uncond", "1.1", batch=5))[0] == 0
    m = json.loads((b / "manifest.json").read_text())
    assert m["sampler"]["guidance"]["ig_scale_uncond"] == 1.1
    assert "ig_scale_uncond" not in json.loads((a / "manifest.json").read_text())["sampler"]["guidance"]
    assert not np.array_equal(load(a)[0], load(b)[0]) and not np.array_equal(load(a)[0], load(reference)[0])


def test_two_processes_under_torchrun_give_the_same_samples(files, tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each torchrun worker runs one thread (see tests/test_bulk.py)
    try:
        code, _, err = run(capsys, *sample_args(files, tmp_path / "one", n=8))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    out = tmp_path / "tr"
    args = sample_args(files, out, n=8)
    args[args.index("--n")] = "--num-samples"
    proc = run_torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1/2: chunk 00000004-00000007.npz written" in proc.stderr
    assert all(np.array_equal(x, y) for x, y in zip(load(tmp_path / "one"), load(out)))


def test_fp32_runs_the_fused_kernels_after_a_preflight_and_agrees_with_the_reference(files, reference, tmp_path,
                                                                                       capsys):
    out = tmp_path / "fp32"
    code, _, err = run(capsys, *sample_args(files, out, "--precision", "fp32", "--save-latents", tmp_path / "l.npy",
                                            batch=5))
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"]["step"] == "cpu-twin"
    assert m["preflight"]["compared"] and all(c["verdict"] == "pass" for c in m["preflight"]["compared"])
    assert m["preflight"]["chosen"]["step"] == "cpu-twin"
    ref_code, _, _ = run(capsys, *sample_args(files, tmp_path / "ref", "--save-latents", tmp_path / "r.npy", batch=5))
    assert ref_code == 0
    # fp32 (contiguous head tokens, fused step) against reference: the reassociation of a few float32 ops
    assert np.abs(np.load(tmp_path / "l.npy") - np.load(tmp_path / "r.npy")).max() <= 1e-4
    assert np.abs(load(out)[0].astype(int) - load(reference)[0].astype(int)).max() <= 1


def test_info_lists_the_raev2_family(capsys):
    code, out, _ = run(capsys, "info")
    facts = json.loads(out)["families"]["raev2"]
    assert code == 0 and facts["models"] == ["RAEv2-XL", "RAEv2-B"] and facts["decoder"] == "rae"
    assert facts["solvers"] == ["euler"] and facts["paper_sampler"]["steps"] == 100
    assert facts["paper_sampler"]["guidance"]["ig_scale"] == 1.78


def test_sweep_can_vary_the_unconditional_ig_scale():
    from igengine.jobs.sweep import expand_grid

    points = expand_grid({"ig_scale_uncond": ["1.1", "1.3"], "cfg_scale": ["1.5"]})
    assert [p.settings["ig_scale_uncond"] for p in points] == [1.1, 1.3]
    assert points[0].name != points[1].name and "igu1.1" in points[0].name


def test_igengine_load_gives_the_pixels_of_the_cli(files, reference):
    import igengine

    pipe = igengine.load(files["official"], encoder_depth=2, vae=files["decoder"], latent_stats=files["stats"],
                         steps=6)
    images = pipe.images([0, 1, 2], seed=0)
    pixels, labels = load(reference)
    assert images.shape == (3, 16, 16, 3) and labels[:3].tolist() == [0, 1, 2]
    assert np.abs(images.astype(int) - pixels[:3].astype(int)).max() <= 1  # batch 3 here, 5 there
