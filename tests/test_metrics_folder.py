"""`igengine evaluate` on folders of PNG / JPEG images (igengine.metrics.reader.FolderImages).

The reader is checked against the arrays the files were written from (PNG is lossless: equal
bytes), in the documented order; the job with a folder against the job with the same pixels in an
npz (the stand-in network of tests/metrics_fixtures.py: no Inception weights are loaded); bad
folders through the CLI as one line and exit status 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from igengine.cli import main
from igengine.jobs import evaluate as evaluate_mod
from igengine.jobs.evaluate import EvaluateError, EvaluateJob, run_evaluate
from igengine.metrics.reader import FolderImages, ImageFormatError, find_images
from igengine.metrics.stats import read_features
from tests.metrics_fixtures import assert_one_line_exit_2, random_images, save_npz, stand_in


def write_png(path, pixels) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def png_folder(root, images, layout=lambda i: f"{i // 4:03d}/{i:05d}.png"):
    for i, img in enumerate(images):
        write_png(root / layout(i), img)
    return root


# ---------------------------------------------------------------- the reader

@pytest.mark.parametrize("batch", [1, 3, 10, 64])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_folder_streams_the_written_pixels_in_path_order(tmp_path, batch, prefetch):
    x = random_images(0, 10, size=9)
    imgs = FolderImages(png_folder(tmp_path / "f", x), workers=2)
    assert (imgs.n, imgs.height, imgs.width, imgs.lossy) == (10, 9, 9, 0)
    got = list(imgs.batches(batch, prefetch=prefetch))
    assert [len(b) for b in got] == [min(batch, 10 - i) for i in range(0, 10, batch)]
    np.testing.assert_array_equal(np.concatenate(got), x)
    np.testing.assert_array_equal(np.concatenate(list(imgs.batches(batch, limit=4))), x[:4])


def test_order_is_by_relative_path_component_by_component_with_any_case_suffix(tmp_path):
    names = ["b.png", "a/c.PNG", "a0.Jpg", "a/b/z.jpeg", "A.png", "a/d.JPEG"]
    for k, name in enumerate(names):
        img = np.full((4, 4, 3), 10 * k, np.uint8)
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / name, format="JPEG" if "jp" in name.lower() else "PNG")
    # not images, or hidden: left out
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "b.webp").write_bytes(b"x")
    write_png(tmp_path / ".hidden.png", np.zeros((5, 5, 3), np.uint8))
    write_png(tmp_path / ".cache" / "x.png", np.zeros((5, 5, 3), np.uint8))
    want = ["A.png", "a/b/z.jpeg", "a/c.PNG", "a/d.JPEG", "a0.Jpg", "b.png"]
    assert find_images(tmp_path) == want
    imgs = FolderImages(tmp_path)
    assert imgs.files == want and imgs.lossy == 3


def test_grayscale_rgba_and_palette_become_rgb(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    rgba = rng.integers(0, 256, (6, 6, 4), dtype=np.uint8)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (6, 6), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "0.png")
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "1.png")
    p = Image.fromarray(index, mode="P")
    p.putpalette(palette.flatten().tolist())
    p.save(tmp_path / "2.png")
    got = np.concatenate(list(FolderImages(tmp_path).batches(8)))
    np.testing.assert_array_equal(got[0], np.repeat(gray[..., None], 3, axis=2))  # replicated
    np.testing.assert_array_equal(got[1], rgba[..., :3])  # alpha dropped, not composited
    np.testing.assert_array_equal(got[2], palette[index])  # looked up


def test_jpeg_is_accepted_and_close_to_its_source(tmp_path):
    x = np.repeat(np.repeat(random_images(2, 3, size=4), 8, axis=1), 8, axis=2)  # smooth 32x32 blocks
    for i, img in enumerate(x):
        Image.fromarray(img).save(tmp_path / f"{i}.jpg", quality=95)
    imgs = FolderImages(tmp_path)
    got = np.concatenate(list(imgs.batches(2)))
    assert got.shape == (3, 32, 32, 3) and imgs.lossy == 3
    assert np.abs(got.astype(int) - x).mean() < 8  # lossy, but these pixels


def test_empty_folder_names_what_it_found(tmp_path):
    with pytest.raises(ImageFormatError, match="no PNG or JPEG images"):
        FolderImages(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.webp").write_bytes(b"x")
    with pytest.raises(ImageFormatError, match=r"1 other file\(s\), e\.g\. sub/a\.webp"):
        FolderImages(tmp_path)


def test_mixed_resolutions_name_two_files_and_their_sizes(tmp_path):
    write_png(tmp_path / "a.png", random_images(3, 1, size=8)[0])
    write_png(tmp_path / "b.png", random_images(3, 1, size=8)[0])
    write_png(tmp_path / "c" / "d.png", np.zeros((8, 10, 3), np.uint8))
    with pytest.raises(ImageFormatError, match=r"a\.png is 8x8, c/d\.png is 8x10"):
        FolderImages(tmp_path)


def test_a_file_that_is_no_image_is_named_before_any_decoding(tmp_path):
    png_folder(tmp_path, random_images(4, 3, size=8))
    (tmp_path / "000" / "00001.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageFormatError, match=r"000/00001\.png: not a readable image"):
        FolderImages(tmp_path)


def test_truncated_pixel_data_is_named_when_decoded(tmp_path):
    png_folder(tmp_path, random_images(5, 5, size=16))
    f = tmp_path / "000" / "00002.png"
    f.write_bytes(f.read_bytes()[:-60])  # header intact, image data cut
    imgs = FolderImages(tmp_path)  # the headers are fine
    with pytest.raises(ImageFormatError, match=r"00002\.png: not a readable image"):
        list(imgs.batches(2))


def test_sixteen_bit_images_are_refused_not_clipped(tmp_path):
    Image.fromarray((np.arange(16).reshape(4, 4) * 4000).astype(np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ImageFormatError, match=r"deep\.png: Pillow mode I;16 .* clip"):
        FolderImages(tmp_path)


# ---------------------------------------------------------------- the job: a folder equals its npz

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """`igengine sample --png` with the embedded digits model: samples.npz and png/000000/*.png."""
    out = tmp_path_factory.mktemp("digits") / "run"
    assert main(["sample", "--n", "12", "--steps", "3", "--seed", "3", "--png", "--out", str(out)]) == 0
    assert len(list((out / "png").rglob("*.png"))) == 12
    return out


@pytest.fixture(scope="module")
def digits_ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_ref") / "ref"
    assert main(["sample", "--n", "10", "--steps", "3", "--seed", "4", "--png", "--out", str(out)]) == 0
    return out


def test_png_folder_of_a_run_evaluates_as_its_samples_npz(tmp_path, digits_run, digits_ref):
    ref = digits_ref / "samples.npz"
    jobs = {"npz": EvaluateJob(samples=digits_run / "samples.npz", ref=ref, device="cpu", batch_size=5,
                               out=tmp_path / "npz.json", save_stats=tmp_path / "npz_stats.npz"),
            "png": EvaluateJob(samples=digits_run / "png", ref=ref, device="cpu", batch_size=5,
                               out=tmp_path / "png.json", save_stats=tmp_path / "png_stats.npz")}
    rec = {k: run_evaluate(job, network=stand_in()) for k, job in jobs.items()}
    assert rec["png"]["samples"]["source"] == "image folder" and rec["npz"]["samples"]["source"] == "npz"
    assert rec["png"]["samples"]["n"] == 12 and rec["png"]["samples"]["resolution"] == [8, 8]
    # Same pixels in the same order: the same features, so exactly the same numbers (FID and KID too).
    np.testing.assert_array_equal(read_features(tmp_path / "png_stats.npz"), read_features(tmp_path / "npz_stats.npz"))
    assert rec["png"]["metrics"] == rec["npz"]["metrics"]
    assert rec["png"]["metrics"]["fid"] > 0 and rec["png"]["metrics"]["kid"] is not None
    # REF as a folder too: the reference's PNGs give the reference's npz numbers.
    both = run_evaluate(EvaluateJob(samples=digits_run / "png", ref=digits_ref / "png", device="cpu", batch_size=5,
                                    out=tmp_path / "both.json"), network=stand_in())
    assert both["reference"]["kind"] == "image-folder" and both["reference"]["images"] == 10
    assert both["metrics"] == rec["npz"]["metrics"]


def test_folder_default_out_is_beside_it_and_the_run_manifest_is_left_alone(digits_run, digits_ref, tmp_path):
    before = (digits_run / "manifest.json").read_text()
    rec = run_evaluate(EvaluateJob(samples=digits_run / "png", ref=digits_ref / "samples.npz", device="cpu"),
                       network=stand_in())
    assert rec["metrics_file"].endswith("run/png.metrics.json") and (digits_run / "png.metrics.json").is_file()
    assert (digits_run / "manifest.json").read_text() == before
    (digits_run / "png.metrics.json").unlink()


def test_an_output_folder_still_means_its_samples_npz(tmp_path, digits_run, digits_ref):
    rec = run_evaluate(EvaluateJob(samples=digits_run, ref=digits_ref, device="cpu", out=tmp_path / "m.json"),
                       network=stand_in())
    assert rec["samples"]["path"] == str(digits_run / "samples.npz")
    assert rec["reference"]["path"] == str(digits_ref / "samples.npz")  # REF's folder: its npz, not grid.png


def test_jpeg_folder_is_evaluated_with_a_note(tmp_path):
    x = random_images(6, 6, size=8)
    for i, img in enumerate(x):
        Image.fromarray(img).save(tmp_path / f"{i}.jpg", quality=90)
    ref = save_npz(tmp_path / "ref.npz", arr_0=random_images(7, 6, size=8))
    rec = run_evaluate(EvaluateJob(samples=tmp_path, ref=ref, device="cpu", out=tmp_path / "m.json"),
                       network=stand_in())
    assert rec["metrics"]["fid"] is not None and rec["samples"]["lossy_files"] == 6
    assert any("JPEG (lossy)" in n for n in rec["notes"])


def test_out_over_one_of_the_images_is_refused(tmp_path):
    png_folder(tmp_path / "f", random_images(8, 4, size=8))
    ref = save_npz(tmp_path / "ref.npz", arr_0=random_images(9, 4, size=8))
    target = tmp_path / "f" / "000" / "00001.png"
    before = target.read_bytes()
    with pytest.raises(EvaluateError, match="would overwrite an input"):
        run_evaluate(EvaluateJob(samples=tmp_path / "f", ref=ref, device="cpu", out=target), network=stand_in())
    assert target.read_bytes() == before


# ---------------------------------------------------------------- through the CLI

def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_weights(monkeypatch):
    """The CLI with the stand-in network in place of the FID Inception (nothing downloaded or verified)."""
    monkeypatch.setattr(evaluate_mod, "load_inception", lambda path, device: stand_in())


def test_cli_png_folder_prints_the_npz_numbers(tmp_path, capsys, digits_run, digits_ref, no_weights):
    code, out, err = cli(capsys, "evaluate", digits_run / "png", "--ref", digits_ref / "samples.npz",
                         "--out", tmp_path / "png.json")
    assert code == 0, err
    got = json.loads(out)
    code, out, err = cli(capsys, "evaluate", digits_run / "samples.npz", "--ref", digits_ref / "samples.npz",
                         "--out", tmp_path / "npz.json")
    assert code == 0, err
    want = json.loads(out)
    assert got["metrics"] == want["metrics"] and list(got["metrics"])[:3] == ["fid", "kid", "kid_std"]


def test_cli_empty_folder(tmp_path, capsys, no_weights):
    (tmp_path / "empty").mkdir()
    ref = save_npz(tmp_path / "ref.npz", arr_0=random_images(10, 4, size=8))
    code, _, err = cli(capsys, "evaluate", tmp_path / "empty", "--ref", ref)
    assert_one_line_exit_2(code, err, "empty", "no PNG or JPEG images")


def test_cli_mixed_resolutions(tmp_path, capsys, no_weights):
    write_png(tmp_path / "f" / "a.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "f" / "b.png", np.zeros((16, 16, 3), np.uint8))
    ref = save_npz(tmp_path / "ref.npz", arr_0=random_images(11, 4, size=8))
    code, _, err = cli(capsys, "evaluate", tmp_path / "f", "--ref", ref)
    assert_one_line_exit_2(code, err, "a.png is 8x8", "b.png is 16x16")
    code, _, err = cli(capsys, "evaluate", ref, "--ref", tmp_path / "f")  # as REF too
    assert_one_line_exit_2(code, err, "a.png is 8x8", "b.png is 16x16")


def test_cli_corrupt_files(tmp_path, capsys, no_weights):
    ref = save_npz(tmp_path / "ref.npz", arr_0=random_images(12, 4, size=16))
    png_folder(tmp_path / "f", random_images(13, 4, size=16))
    (tmp_path / "f" / "000" / "00003.png").write_bytes(b"\x89PNG garbage")
    code, _, err = cli(capsys, "evaluate", tmp_path / "f", "--ref", ref)
    assert_one_line_exit_2(code, err, "00003.png", "not a readable image")
    png_folder(tmp_path / "g", random_images(14, 4, size=16))
    cut = tmp_path / "g" / "000" / "00001.png"
    cut.write_bytes(cut.read_bytes()[:-60])  # found only when decoded, after the progress lines began
    code, _, err = cli(capsys, "evaluate", tmp_path / "g", "--ref", ref)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and "Traceback" not in err and err.splitlines()[-1] == errors[0], err
    assert_one_line_exit_2(code, errors[0], "00001.png", "not a readable image (image file is truncated)")
    assert not (tmp_path / "g.metrics.json").exists()


def test_cli_output_folder_without_samples_npz_points_at_its_pngs(tmp_path, capsys, no_weights):
    run = tmp_path / "run"
    png_folder(run / "png", random_images(15, 4, size=8), layout=lambda i: f"000000/{i:06d}.png")
    (run / "manifest.json").write_text("{}")
    code, _, err = cli(capsys, "evaluate", run, "--ref", run / "png")
    assert_one_line_exit_2(code, err, "without samples.npz", f"pass {run / 'png'}")


def test_cli_kid_options_are_checked(tmp_path, capsys, no_weights):
    s = save_npz(tmp_path / "s.npz", arr_0=random_images(16, 4, size=8))
    code, _, err = cli(capsys, "evaluate", s, "--ref", s, "--kid-subsets", 0)
    assert_one_line_exit_2(code, err, "--kid-subsets must be >= 1")
    code, _, err = cli(capsys, "evaluate", s, "--ref", s, "--kid-subset-size", 1)
    assert_one_line_exit_2(code, err, "--kid-subset-size must be >= 2")
