"""The planted sweep's own logic: the paired difference of two repairs and the work copy."""
import numpy as np
import pytest

from benchmarks.planted_sweep import difference_vs, work_copy
from trustrepair.app.planted_report import fraction_undone


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
