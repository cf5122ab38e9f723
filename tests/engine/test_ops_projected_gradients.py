"""trustrepair.engine.ops.projected_gradients (the eigenvalue correction's squares, projected gradients,
eigenbasis scores) against naive per-example loops, on the awkward shapes of ops_cases."""
import pytest
import torch
from ops_cases import (GRADIENT_FIRST, PER_TOKEN, SHAPES, TOKENS_FIRST, FORM_GRADIENT, assert_close, cost_module,
                       force_costs, naive_ghost, naive_gradients, naive_scores, naive_squares, operands)

from trustrepair.engine.ops import blocking
from trustrepair.engine.ops import ghost_dots as GD
from trustrepair.engine.ops import projected_gradients as PG
from trustrepair.engine.tunables import override


@pytest.mark.parametrize("shape", SHAPES)
def test_squares_match_naive_float64(shape):
    a, g, q_a, q_s, _ = operands(shape)
    expected = naive_squares(a, g, q_a, q_s)
    assert_close(PG.projected_gradient_squares_reference(a, g, q_a, q_s), expected, 1e-12, "reference, cost model")
    assert_close(PG.projected_gradient_squares(a, g, q_a, q_s), expected, 1e-12, "dispatcher")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", ["tokens first", "gradient first"])
def test_squares_and_projected_gradients_in_each_order_match_naive(shape, order, monkeypatch):
    a, g, q_a, q_s, _ = operands(shape)
    force_costs(monkeypatch, *(TOKENS_FIRST if order == "tokens first" else GRADIENT_FIRST))
    expected = torch.stack([q_s.T @ grad @ q_a for grad in naive_gradients(a, g)])
    assert_close(PG.projected_gradient_squares_reference(a, g, q_a, q_s), expected.square().sum(0), 1e-12, order)
    assert_close(PG.projected_gradients(a, g, q_a, q_s), expected, 1e-12, order)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strategy", ["rotate queries", "project examples tokens first",
                                      "project examples gradient first"])
def test_scores_each_strategy_matches_naive_float64(shape, strategy, monkeypatch):
    a, g, q_a, q_s, queries = operands(shape)
    expected = naive_scores(a, g, q_a, q_s, queries)
    assert_close(PG.projected_gradient_scores(a, g, q_a, q_s, queries), expected, 1e-12, "cost model")
    if strategy == "rotate queries":
        force_costs(monkeypatch, ["ghost_per_token_cost", "ghost_gradient_first_cost"],
                    ["squares_tokens_first_cost", "squares_gradient_first_cost"])
    else:
        force_costs(monkeypatch, [], ["ghost_per_token_cost", "ghost_gradient_first_cost"])
        order = TOKENS_FIRST if strategy.endswith("tokens first") else GRADIENT_FIRST
        monkeypatch.setattr(cost_module(order[0][0]), order[0][0], lambda *args: 1)
        monkeypatch.setattr(cost_module(order[1][0]), order[1][0], lambda *args: 10**17)
    assert_close(PG.projected_gradient_scores(a, g, q_a, q_s, queries), expected, 1e-12, strategy)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", ["tokens first", "gradient first"])
def test_projected_scores_and_weighted_square_norms_match_naive(shape, order, monkeypatch):
    """The always-project strategy (projected_scores) and sum_ij P_b^2 W (projected_square_norms), small
    chunks so that several slices are written."""
    a, g, q_a, q_s, queries = operands(shape)
    weights = torch.rand(g.shape[2], a.shape[2], dtype=a.dtype, generator=torch.Generator().manual_seed(5))
    force_costs(monkeypatch, *(TOKENS_FIRST if order == "tokens first" else GRADIENT_FIRST))
    projected = torch.stack([q_s.T @ grad @ q_a for grad in naive_gradients(a, g)])
    with override(chunk_elements=1):
        assert_close(PG.projected_scores(a, g, q_a, q_s, queries), naive_scores(a, g, q_a, q_s, queries), 1e-12, order)
        assert_close(PG.projected_square_norms(a, g, q_a, q_s, weights), (projected.square() * weights).sum((1, 2)),
                     1e-12, order)


@pytest.mark.parametrize("blocking_kind", ["CPU slabs", "GPU batched products", "GPU batched products, zero-padded"])
@pytest.mark.parametrize("ghost_path", [PER_TOKEN, FORM_GRADIENT])
def test_chunks_slabs_and_tiles_give_the_same_result(ghost_path, blocking_kind, monkeypatch):
    """Every chunking gives the same results, for the CPU's cache-sized slabs and for the batched
    products a GPU gets (forced here on the CPU; with the ``pad_widths`` setting on, its slabs are formed
    at the even width 24 of the odd 17), both against the float64 naive loops; the chunk, slab and tile
    settings change the chunking, not the results."""
    a, g, q_a, q_s, u = operands((6, 5, 17, 9))
    force_costs(monkeypatch, *ghost_path)
    monkeypatch.setattr(blocking, "cache_blocked", lambda device: blocking_kind == "CPU slabs")
    with override(pad_widths={"cpu": blocking_kind.endswith("zero-padded")}):
        assert_close(PG.projected_gradient_squares_reference(a, g, q_a, q_s), naive_squares(a, g, q_a, q_s), 1e-12,
                     f"squares, {blocking_kind}")
        assert_close(GD.ghost_dots(a, g, u), naive_ghost(a, g, u), 1e-12, f"ghost, {blocking_kind}")

        def results():
            return (PG.projected_gradients(a, g, q_a, q_s), PG.projected_gradient_scores(a, g, q_a, q_s, u),
                    GD.ghost_dots(a, g, u), GD.low_rank_ghost_dots(a, g, u[:, :, :2], u[:, :2, :]),
                    PG.projected_gradient_squares_reference(a, g, q_a, q_s))

        full = results()
        # one example per chunk, one row of G_b per slab, one row of each projected tile per slab
        with override(chunk_elements=1, tile_elements=1, slab_elements=1):
            for x, y in zip(full, results()):
                assert_close(y, x, 1e-13, "chunked")


def test_chunk_setting_changes_the_chunking_not_the_result():
    """The library reads chunk_elements at call time: a smaller chunk splits the batch into more chunks."""
    a, g, q_a, q_s, _ = operands((6, 5, 17, 9))
    assert len(blocking.row_chunks(6, 5 * 26)) == 1
    full = PG.projected_gradients(a, g, q_a, q_s)
    with override(chunk_elements=2 * 5 * 26):
        assert len(blocking.row_chunks(6, 5 * 26)) == 3
        assert_close(PG.projected_gradients(a, g, q_a, q_s), full, 1e-13, "chunked")
    assert len(blocking.row_chunks(6, 5 * 26)) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    """float32 / bfloat16 inputs give float32 results; the error against float64 on the same (rounded)
    inputs is within float32 rounding, i.e. the bfloat16 inputs are upcast before any product."""
    a, g, q_a, q_s, u = operands((3, 11, 17, 65), dtype=dtype)
    exact = [naive_squares(a, g, q_a, q_s), naive_scores(a, g, q_a, q_s, u), naive_ghost(a, g, u)]
    got = [PG.projected_gradient_squares(a, g, q_a, q_s), PG.projected_gradient_scores(a, g, q_a, q_s, u),
           GD.ghost_dots(a, g, u)]
    for name, x, y in zip(["squares", "scores", "ghost"], got, exact):
        assert x.dtype == torch.float32, name
        assert_close(x, y, 1e-4, name)


def test_cost_model_prefers_tokens_first_for_short_examples():
    assert PG.squares_tokens_first_cost(8, 512, 512) < PG.squares_gradient_first_cost(8, 512, 512)
    assert PG.squares_tokens_first_cost(4096, 64, 64) > PG.squares_gradient_first_cost(4096, 64, 64)
    assert GD.ghost_per_token_cost(64, 512, 512, 2) < GD.ghost_gradient_first_cost(64, 512, 512, 2)
    assert GD.ghost_per_token_cost(64, 512, 512, 16) > GD.ghost_gradient_first_cost(64, 512, 512, 16)


def test_shape_errors_name_the_expected_shapes():
    a, g, q_a, q_s, u = operands((2, 3, 5, 4))
    with pytest.raises(ValueError, match="same B and T"):
        GD.ghost_dots(a, g[:, :2], u)
    with pytest.raises(ValueError, match=r"q_a must be \(5, 5\)"):
        PG.projected_gradient_squares(a, g, q_s, q_s)
    with pytest.raises(ValueError, match=r"\(K, 4, 5\)"):
        GD.ghost_dots(a, g, u.transpose(1, 2))
    with pytest.raises(ValueError, match="low-rank factors"):
        GD.low_rank_ghost_dots(a, g, torch.zeros(1, 4, 2), torch.zeros(1, 3, 5))


def test_cache_blocking_only_on_cpu():
    assert blocking.cache_blocked(torch.device("cpu"))
    assert not blocking.cache_blocked(torch.device("cuda", 0))
