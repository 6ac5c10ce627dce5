"""The embedded model's pipeline is right, not just running: samples look like the digits asked for."""

import pytest

from igengine.jobs.sample import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="embedded checkpoint missing")


@pytest.mark.slow
def test_held_out_classifier_recognises_90_percent_of_1000_default_samples(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn (test extra) not installed")
    from igengine.digits.data import load_split
    from igengine.digits.evaluate import sample_pixels, score, train_classifier, _through_pixels

    clf = train_classifier()
    split = load_split()
    real_feats = clf.features(_through_pixels(split["train_x"]))
    pixels, labels = sample_pixels(1000, seed=123, ig_scale=None, cfg_scale=None, out=tmp_path / "s")
    result = score(clf, pixels, labels, real_feats)
    assert result["accuracy"] >= 0.90, result
    # A sanity bound on the distribution too: uniform noise images sit far away in feature space.
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, size=(1000, 8, 8, 3), dtype=np.uint8)
    assert result["fd"] < 0.25 * score(clf, noise, labels, real_feats)["fd"]
