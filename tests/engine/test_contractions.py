"""The per-example gradient contractions (trustrepair.engine.contractions) against naive per-example loops, on
fresh random inputs of awkward shapes: one token, a batch of one, an all-masked example, widths 1, 17, 65."""
import sys
import types

import pytest
import torch

from trustrepair.engine import contractions as C

SHAPES = [  # (B, T, d_in, d_out)
    (1, 1, 1, 1),
    (2, 1, 17, 5),
    (3, 7, 65, 17),
    (1, 9, 5, 65),
    (4, 3, 17, 17),
    (5, 70, 17, 1),
]


def _operands(shape, dtype=torch.float64, n_mats=3, seed=0):
    """Random a, g (about 30% of tokens masked, and example 0 entirely when B > 1), orthogonal bases, matrices."""
    batch, tokens, d_in, d_out = shape
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, tokens, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(batch, tokens, d_out, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, tokens, generator=gen) > 0.3
    if batch > 1:
        mask[0] = False
    a, g = a * mask[..., None], g * mask[..., None]
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))[0]
    q_s = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=torch.float64))[0]
    mats = torch.randn(n_mats, d_out, d_in, generator=gen, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (a, g, q_a, q_s, mats))


def _naive_gradients(a, g):
    """G_b = sum_t g_bt a_bt^T, one outer product at a time, in float64."""
    a, g = a.double(), g.double()
    out = torch.zeros(a.shape[0], g.shape[2], a.shape[2], dtype=torch.float64)
    for b in range(a.shape[0]):
        for t in range(a.shape[1]):
            out[b] += torch.outer(g[b, t], a[b, t])
    return out


def _naive_squares(a, g, q_a, q_s):
    total = 0
    for grad in _naive_gradients(a, g):
        total = total + (q_s.double().T @ grad @ q_a.double()) ** 2
    return total


def _naive_scores(a, g, q_a, q_s, queries):
    out = torch.zeros(a.shape[0], queries.shape[0], dtype=torch.float64)
    for b, grad in enumerate(_naive_gradients(a, g)):
        projected = q_s.double().T @ grad @ q_a.double()
        for q in range(queries.shape[0]):
            out[b, q] = (projected * queries[q].double()).sum()
    return out


def _naive_ghost(a, g, u):
    out = torch.zeros(a.shape[0], u.shape[0], dtype=torch.float64)
    for b in range(a.shape[0]):
        for k in range(u.shape[0]):
            for t in range(a.shape[1]):
                out[b, k] += g[b, t].double() @ u[k].double() @ a[b, t].double()
    return out


def assert_close(actual, expected, rtol, what):
    """Relative error against the largest expected magnitude, with a verbose report of the worst entry."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs()
    scale = expected.abs().max().clamp_min(1e-30)
    worst = int(err.argmax())
    assert float(err.max()) <= rtol * float(scale), (
        f"{what}: max error {float(err.max()):.3e} (relative {float(err.max() / scale):.3e} > {rtol:g}) at flat "
        f"index {worst}; {int((err > rtol * scale).sum())} of {err.numel()} entries off")


@pytest.mark.parametrize("shape", SHAPES)
def test_squares_match_naive_float64(shape):
    a, g, q_a, q_s, _ = _operands(shape)
    expected = _naive_squares(a, g, q_a, q_s)
    assert_close(C.projected_gradient_squares_reference(a, g, q_a, q_s), expected, 1e-12, "reference, cost model")
    assert_close(C.projected_gradient_squares(a, g, q_a, q_s), expected, 1e-12, "dispatcher")


def _force(monkeypatch, cheap, dear):
    """Make the cost functions named in ``cheap`` free and those in ``dear`` prohibitive."""
    for name in cheap:
        monkeypatch.setattr(C, name, lambda *args: 0)
    for name in dear:
        monkeypatch.setattr(C, name, lambda *args: 10**18)


TOKENS_FIRST = (["squares_tokens_first_cost"], ["squares_gradient_first_cost"])
GRADIENT_FIRST = (["squares_gradient_first_cost"], ["squares_tokens_first_cost"])
PER_TOKEN = (["ghost_per_token_cost"], ["ghost_gradient_first_cost"])
FORM_GRADIENT = (["ghost_gradient_first_cost"], ["ghost_per_token_cost"])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", ["tokens first", "gradient first"])
def test_squares_and_projected_gradients_in_each_order_match_naive(shape, order, monkeypatch):
    a, g, q_a, q_s, _ = _operands(shape)
    _force(monkeypatch, *(TOKENS_FIRST if order == "tokens first" else GRADIENT_FIRST))
    expected = torch.stack([q_s.T @ grad @ q_a for grad in _naive_gradients(a, g)])
    assert_close(C.projected_gradient_squares_reference(a, g, q_a, q_s), expected.square().sum(0), 1e-12, order)
    assert_close(C.projected_gradients(a, g, q_a, q_s), expected, 1e-12, order)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strategy", ["rotate queries", "project examples tokens first",
                                      "project examples gradient first"])
def test_scores_each_strategy_matches_naive_float64(shape, strategy, monkeypatch):
    a, g, q_a, q_s, queries = _operands(shape)
    expected = _naive_scores(a, g, q_a, q_s, queries)
    assert_close(C.projected_gradient_scores(a, g, q_a, q_s, queries), expected, 1e-12, "dispatcher, cost model")
    if strategy == "rotate queries":
        _force(monkeypatch, ["ghost_per_token_cost", "ghost_gradient_first_cost"],
               ["squares_tokens_first_cost", "squares_gradient_first_cost"])
    else:
        _force(monkeypatch, [], ["ghost_per_token_cost", "ghost_gradient_first_cost"])
        order = TOKENS_FIRST if strategy.endswith("tokens first") else GRADIENT_FIRST
        monkeypatch.setattr(C, order[0][0], lambda *args: 1)
        monkeypatch.setattr(C, order[1][0], lambda *args: 10**17)
    assert_close(C.projected_gradient_scores_reference(a, g, q_a, q_s, queries), expected, 1e-12, strategy)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_mats", [1, 4])
def test_ghost_dots_both_paths_match_naive_float64(shape, n_mats, monkeypatch):
    a, g, _, _, u = _operands(shape, n_mats=n_mats)
    expected = _naive_ghost(a, g, u)
    assert_close(C.ghost_dots(a, g, u), expected, 1e-12, "dispatcher, cost model")
    with monkeypatch.context() as patch:
        _force(patch, *PER_TOKEN)
        assert_close(C.ghost_dots_reference(a, g, u), expected, 1e-12, "per token")
    with monkeypatch.context() as patch:
        _force(patch, *FORM_GRADIENT)
        assert_close(C.ghost_dots_reference(a, g, u), expected, 1e-12, "gradient first")


@pytest.mark.parametrize("rows, width, block", [(1, 1, 256), (7, 17, 4), (33, 65, 16), (5, 300, 256), (0, 9, 4)])
def test_gram_upper_and_symmetrisation_equal_the_full_product(rows, width, block):
    gen = torch.Generator().manual_seed(rows + width)
    x = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    start = torch.randn(width, width, generator=gen, dtype=torch.float64)
    start = start + start.T
    out = C.add_gram_upper_(start.clone(), x, block=block)
    assert_close(C.symmetric_from_upper(out), start + x.T @ x, 1e-13, "upper-triangle Gram")
    below = torch.tril(torch.ones(width, width, dtype=torch.bool), diagonal=-block)
    assert torch.equal(out[below], start[below]), "entries below the diagonal blocks must be untouched"
    with pytest.raises(ValueError, match="add_gram_upper_ needs"):
        C.add_gram_upper_(torch.zeros(width + 1, width + 1, dtype=torch.float64), x)
    with pytest.raises(ValueError, match="block width >= 1"):
        C.add_gram_upper_(start.clone(), x, block=0)


def test_gram_upper_default_block_is_the_module_setting(monkeypatch):
    """GRAM_BLOCK (chosen per device class from gpu_check's timings) sets the default block."""
    x = torch.randn(6, 10, dtype=torch.float64)
    monkeypatch.setitem(C.GRAM_BLOCK, "cpu", 3)
    out = C.add_gram_upper_(torch.zeros(10, 10, dtype=torch.float64), x)
    assert out[9, 0] == 0 and out[3, 2] == 0 and out[2, 0] != 0, "block 3: only the diagonal blocks of 3 rows"


@pytest.mark.parametrize("shape", SHAPES)
def test_low_rank_ghost_dots_equal_ghost_dots_of_the_product(shape):
    a, g, _, _, _ = _operands(shape)
    gen = torch.Generator().manual_seed(5)
    left = torch.randn(3, shape[3], 2, generator=gen, dtype=torch.float64)
    right = torch.randn(3, 2, shape[2], generator=gen, dtype=torch.float64)
    assert_close(C.low_rank_ghost_dots(a, g, left, right), _naive_ghost(a, g, left @ right), 1e-12, "low rank")


@pytest.mark.parametrize("blocking", ["CPU slabs", "GPU batched products", "GPU batched products, zero-padded"])
@pytest.mark.parametrize("ghost_path", [PER_TOKEN, FORM_GRADIENT])
def test_chunks_slabs_and_tiles_give_the_same_result(ghost_path, blocking, monkeypatch):
    """Every chunking gives the same results, for the CPU's cache-sized slabs and for the batched
    products a GPU gets (forced here on the CPU; with ``layout.PAD_WIDTHS`` on, its slabs are formed
    at the even width 24 of the odd 17), both against the float64 naive loops."""
    from trustrepair.engine import layout

    a, g, q_a, q_s, u = _operands((6, 5, 17, 9))
    _force(monkeypatch, *ghost_path)
    monkeypatch.setattr(C, "cache_blocked", lambda device: blocking == "CPU slabs")
    monkeypatch.setitem(layout.PAD_WIDTHS, "cpu", blocking.endswith("zero-padded"))
    assert_close(C.projected_gradient_squares_reference(a, g, q_a, q_s), _naive_squares(a, g, q_a, q_s), 1e-12,
                 f"squares, {blocking}")
    assert_close(C.ghost_dots_reference(a, g, u), _naive_ghost(a, g, u), 1e-12, f"ghost, {blocking}")

    def results():
        return (C.projected_gradients(a, g, q_a, q_s), C.projected_gradient_scores_reference(a, g, q_a, q_s, u),
                C.ghost_dots_reference(a, g, u), C.low_rank_ghost_dots(a, g, u[:, :, :2], u[:, :2, :]),
                C.projected_gradient_squares_reference(a, g, q_a, q_s))

    full = results()
    monkeypatch.setattr(C, "CHUNK_ELEMENTS", 1)  # one example per chunk
    monkeypatch.setattr(C, "TILE_ELEMENTS", 1)  # one row of G_b per slab
    monkeypatch.setattr(C, "SLAB_ELEMENTS", 1)  # one row of each projected tile per slab
    for x, y in zip(full, results()):
        assert_close(y, x, 1e-13, "chunked")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    """float32 / bfloat16 inputs give float32 results; the error against float64 on the same (rounded)
    inputs is within float32 rounding, i.e. the bfloat16 inputs are upcast before any product."""
    a, g, q_a, q_s, u = _operands((3, 11, 17, 65), dtype=dtype)
    exact = [_naive_squares(a, g, q_a, q_s), _naive_scores(a, g, q_a, q_s, u), _naive_ghost(a, g, u)]
    got = [C.projected_gradient_squares(a, g, q_a, q_s), C.projected_gradient_scores(a, g, q_a, q_s, u),
           C.ghost_dots(a, g, u)]
    for name, x, y in zip(["squares", "scores", "ghost"], got, exact):
        assert x.dtype == torch.float32, name
        assert_close(x, y, 1e-4, name)


def test_cost_model_prefers_tokens_first_for_short_examples():
    assert C.squares_tokens_first_cost(8, 512, 512) < C.squares_gradient_first_cost(8, 512, 512)
    assert C.squares_tokens_first_cost(4096, 64, 64) > C.squares_gradient_first_cost(4096, 64, 64)
    assert C.ghost_per_token_cost(64, 512, 512, 2) < C.ghost_gradient_first_cost(64, 512, 512, 2)
    assert C.ghost_per_token_cost(64, 512, 512, 16) > C.ghost_gradient_first_cost(64, 512, 512, 16)


def test_shape_errors_name_the_expected_shapes():
    a, g, q_a, q_s, u = _operands((2, 3, 5, 4))
    with pytest.raises(ValueError, match="same B and T"):
        C.ghost_dots(a, g[:, :2], u)
    with pytest.raises(ValueError, match=r"q_a \(5, 5\)"):
        C.projected_gradient_squares(a, g, q_s, q_s)
    with pytest.raises(ValueError, match=r"\(K, 4, 5\)"):
        C.ghost_dots(a, g, u.transpose(1, 2))
    with pytest.raises(ValueError, match="low-rank factors"):
        C.low_rank_ghost_dots(a, g, torch.zeros(1, 4, 2), torch.zeros(1, 3, 5))


def test_triton_enabled_only_for_cuda_with_triton_and_no_override(monkeypatch):
    cuda_like = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(C, "_triton_importable", lambda: True)
    monkeypatch.delenv("TRUSTREPAIR_DISABLE_TRITON", raising=False)
    assert C.triton_enabled(cuda_like)
    assert not C.triton_enabled(torch.zeros(1))
    monkeypatch.setenv("TRUSTREPAIR_DISABLE_TRITON", "1")
    assert not C.triton_enabled(cuda_like)
    monkeypatch.delenv("TRUSTREPAIR_DISABLE_TRITON")
    monkeypatch.setattr(C, "_triton_importable", lambda: False)
    assert not C.triton_enabled(cuda_like)


def test_cache_blocking_only_on_cpu():
    assert C.cache_blocked(torch.device("cpu"))
    assert not C.cache_blocked(torch.device("cuda", 0))


def test_only_the_ops_in_triton_ops_go_to_triton(monkeypatch):
    """With Triton enabled, the eigenvalue correction goes to its kernel; ghost dots and eigenbasis scores
    stay on the reference (their kernels lost on the GPU: see TRITON_OPS), giving its results."""
    assert C.TRITON_OPS == {"projected_gradient_squares"}
    projected = types.ModuleType("trustrepair.kernels.projected_gradients")
    projected.projected_gradient_squares_triton = lambda *args: "sq"
    monkeypatch.setitem(sys.modules, "trustrepair.kernels.projected_gradients", projected)
    monkeypatch.setattr(C, "triton_enabled", lambda tensor: True)
    a, g, q_a, q_s, u = _operands((2, 3, 5, 4))
    assert C.uses_triton("projected_gradient_squares", a)
    assert not C.uses_triton("ghost_dots", a) and not C.uses_triton("projected_gradient_scores", a)
    assert C.projected_gradient_squares(a, g, q_a, q_s) == "sq"
    assert_close(C.ghost_dots(a, g, u), _naive_ghost(a, g, u), 1e-12, "ghost dots on the reference")
    assert_close(C.projected_gradient_scores(a, g, q_a, q_s, u), _naive_scores(a, g, q_a, q_s, u), 1e-12,
                 "scores on the reference")


def test_dispatchers_route_to_the_triton_modules_when_enabled(monkeypatch):
    """With triton_enabled forced on and every op in TRITON_OPS, each dispatcher calls the kernel module's
    function with its arguments."""
    monkeypatch.setattr(C, "TRITON_OPS", frozenset({"projected_gradient_squares", "projected_gradient_scores",
                                                     "ghost_dots"}))
    calls = []
    projected = types.ModuleType("trustrepair.kernels.projected_gradients")
    projected.projected_gradient_squares_triton = lambda *args: calls.append(("squares", len(args))) or "sq"
    projected.projected_gradient_scores_triton = lambda *args: calls.append(("scores", len(args))) or "sc"
    ghost = types.ModuleType("trustrepair.kernels.ghost_dots")
    ghost.ghost_dots_triton = lambda *args: calls.append(("ghost", len(args))) or "gd"
    monkeypatch.setitem(sys.modules, "trustrepair.kernels.projected_gradients", projected)
    monkeypatch.setitem(sys.modules, "trustrepair.kernels.ghost_dots", ghost)
    monkeypatch.setattr(C, "triton_enabled", lambda tensor: True)
    a, g, q_a, q_s, u = _operands((2, 3, 5, 4))
    assert C.projected_gradient_squares(a, g, q_a, q_s) == "sq"
    assert C.projected_gradient_scores(a, g, q_a, q_s, u) == "sc"
    assert C.ghost_dots(a, g, u) == "gd"
    assert calls == [("squares", 4), ("scores", 5), ("ghost", 3)]
