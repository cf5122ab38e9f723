"""trustrepair.engine.ops.ghost_dots against naive per-example loops, on the awkward shapes of ops_cases."""
import pytest
import torch
from ops_cases import FORM_GRADIENT, PER_TOKEN, SHAPES, assert_close, force_costs, naive_ghost, operands

from trustrepair.engine.ops import ghost_dots as GD


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_mats", [1, 4])
def test_ghost_dots_both_paths_match_naive_float64(shape, n_mats, monkeypatch):
    a, g, _, _, u = operands(shape, n_mats=n_mats)
    expected = naive_ghost(a, g, u)
    assert_close(GD.ghost_dots(a, g, u), expected, 1e-12, "cost model")
    with monkeypatch.context() as patch:
        force_costs(patch, *PER_TOKEN)
        assert_close(GD.ghost_dots(a, g, u), expected, 1e-12, "per token")
    with monkeypatch.context() as patch:
        force_costs(patch, *FORM_GRADIENT)
        assert_close(GD.ghost_dots(a, g, u), expected, 1e-12, "gradient first")


@pytest.mark.parametrize("shape", SHAPES)
def test_low_rank_ghost_dots_equal_ghost_dots_of_the_product(shape):
    a, g, _, _, _ = operands(shape)
    gen = torch.Generator().manual_seed(5)
    left = torch.randn(3, shape[3], 2, generator=gen, dtype=torch.float64)
    right = torch.randn(3, 2, shape[2], generator=gen, dtype=torch.float64)
    assert_close(GD.low_rank_ghost_dots(a, g, left, right), naive_ghost(a, g, left @ right), 1e-12, "low rank")
