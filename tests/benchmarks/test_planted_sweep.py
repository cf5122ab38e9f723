"""The planted sweep's own logic: the repair-only damping scale and the paired difference of two repairs."""
import numpy as np
import pytest
import torch

from benchmarks.planted_sweep import ScaledDamping, difference_vs, work_copy
from trustrepair.app.planted_report import fraction_undone
from trustrepair.engine.ekfac import EKFACFactors, ModuleFactors


def _factors() -> EKFACFactors:
    eye = torch.eye(3, dtype=torch.float64)
    lam = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    return EKFACFactors({"layer": ModuleFactors(eye, torch.eye(2, dtype=torch.float64), lam, 10, 4)}, {}, {})


def test_scaled_damping_scales_only_the_default_and_the_preconditioner_follows():
    factors = _factors()
    scaled = ScaledDamping(factors, 10.0)
    assert scaled.damping("layer") == pytest.approx(10 * factors.damping("layer")) == pytest.approx(3.5)
    assert scaled.damping("layer", 0.25) == 0.25  # an absolute damping is used as given
    grad = {"layer": torch.ones(2, 3, dtype=torch.float64)}
    expected = 1.0 / (factors.modules["layer"].lambda_ + 3.5)  # identity eigenbases: elementwise
    torch.testing.assert_close(scaled.precondition(grad)["layer"], expected)
    assert scaled.modules["layer"].lambda_ is factors.modules["layer"].lambda_  # shared, not copied
    moved = scaled.to("cpu")  # as the scorers do: the scale must survive the move
    assert isinstance(moved, ScaledDamping) and moved.damping("layer") == pytest.approx(3.5)


def test_difference_vs_is_the_difference_of_the_two_fractions_with_a_paired_se():
    rng = np.random.default_rng(0)
    post = rng.normal(size=50)
    gold = post - 0.5 - 0.1 * rng.normal(size=50)
    reference = post - 1.0 - 0.3 * rng.normal(size=50)
    repaired = reference - 0.2 - 0.01 * rng.normal(size=50)  # nearly the reference, shifted
    diff, se = difference_vs(post, repaired, reference, gold)
    assert diff == pytest.approx(fraction_undone(post, repaired, gold)[0] - fraction_undone(post, reference, gold)[0])
    assert diff == pytest.approx(0.2 / 0.5, rel=0.05)
    # the shared noise of the two repairs cancels: far tighter than either fraction's own SE
    assert se < 0.2 * fraction_undone(post, reference, gold)[1]
    assert difference_vs(post, reference, reference, gold) == (0.0, 0.0)


def test_work_copy_leaves_the_repair_deltas_behind_and_keeps_an_existing_copy(tmp_path):
    source = tmp_path / "seed-0"
    (source / "repairs").mkdir(parents=True)
    (source / "repairs" / "bias_dpp.safetensors").write_text("x")
    (source / "config.json").write_text("{}")
    (source / "beta_sweep.png").write_text("x")
    copy = work_copy(source, tmp_path / "work" / "seed-0")
    assert (copy / "config.json").is_file() and not (copy / "repairs").exists() and not (copy / "beta_sweep.png").exists()
    (copy / "config.json").write_text('{"kept": 1}')
    work_copy(source, copy)
    assert (copy / "config.json").read_text() == '{"kept": 1}'
