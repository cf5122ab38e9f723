"""The scores the demo's subsets are chosen by (DemoConfig.selection_scores): raw, or normalised by the
self-influence, and the round trip of the self-influences through scores.safetensors."""
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from trustrepair.app.records import Scores
from trustrepair.app.settings import DemoConfig


def _scores(sigma):
    rng = np.random.default_rng(0)
    return Scores({"truthfulness": rng.normal(size=7), "bias": rng.normal(size=7)},
                  rng.normal(size=(7, 3)).astype(np.float32), sigma)


def test_normalized_selection_scores_divide_by_the_root_of_the_self_influence(tmp_path):
    sigma = np.array([4.0, 1.0, 0.25, 9.0, 0.0, 2.0, 16.0])
    scores = _scores(sigma)
    normalized = scores.for_selection("normalized")
    for aspect, values in scores.per_aspect.items():
        expected = np.where(sigma > 0, values / np.sqrt(np.where(sigma > 0, sigma, 1.0)), 0.0)
        np.testing.assert_allclose(normalized[aspect], expected, rtol=1e-12)
        np.testing.assert_array_equal(scores.for_selection("raw")[aspect], values)
    save_file(scores.to_arrays(), str(tmp_path / "scores.safetensors"))
    back = Scores.from_arrays(load_file(str(tmp_path / "scores.safetensors")), ["truthfulness", "bias"])
    np.testing.assert_array_equal(back.self_influence, sigma)


def test_scores_without_self_influence_refuse_normalized_selection_and_bad_settings_are_refused():
    scores = _scores(None)
    assert "self_influence" not in scores.to_arrays()
    with pytest.raises(ValueError, match="no self-influences"):
        scores.for_selection("normalized")
    with pytest.raises(ValueError, match="selection_scores must be 'raw' or 'normalized'"):
        DemoConfig(selection_scores="relatif")
