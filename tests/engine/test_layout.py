"""Row-aligned storage for odd-width (bias-folded) operands: same values and shapes, aligned rows."""
import pytest
import torch
from torch import nn

from trustrepair.engine.layout import ROW_ALIGNMENT, aligned, empty_aligned, is_aligned, padded_width, zero_padded
from trustrepair.engine.layers import TrackedLayer


@pytest.mark.parametrize("width,padded", [(1, 8), (8, 8), (9, 16), (769, 776), (3073, 3080)])
def test_padded_width(width, padded):
    assert padded_width(width) == padded


@pytest.mark.parametrize("shape", [(5, 769), (3, 7, 17), (2, 1, 8), (4, 1)])
def test_empty_aligned_is_a_view_with_aligned_rows(shape):
    x = empty_aligned(*shape, dtype=torch.float32, device=torch.device("cpu"))
    assert tuple(x.shape) == shape and x.stride(-1) == 1
    assert all(s % ROW_ALIGNMENT == 0 for s in x.stride()[:-1])
    assert is_aligned(x)


def test_is_aligned_rejects_odd_rows_and_offsets():
    base = torch.zeros(6, 16)
    assert is_aligned(base)
    assert not is_aligned(torch.zeros(6, 17))
    assert not is_aligned(base[:, 1:9])  # starts one element into the buffer
    assert not is_aligned(base.T)  # columns are not unit-stride
    assert is_aligned(torch.zeros(1, 17))  # one row: nothing to misalign


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_aligned_copies_only_when_needed(dtype):
    gen = torch.Generator().manual_seed(0)
    odd = torch.randn(3, 5, 17, generator=gen)
    out = aligned(odd, dtype)
    assert is_aligned(out) and out.dtype == dtype and tuple(out.shape) == (3, 5, 17)
    assert torch.equal(out, odd.to(dtype))
    assert aligned(out) is out and aligned(out, dtype) is out


@pytest.mark.parametrize("shape,dims", [((5, 769), 1), ((3, 7, 17), 1), ((9, 17), 2), ((2, 17, 8), 2), ((4, 1), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_padded_widens_with_zeros(shape, dims, dtype):
    """The true values in the leading block, zeros in every new row and column (storage from torch.empty,
    so a missed zero shows as garbage or NaN), aligned rows, the requested dtype."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    out = zero_padded(x, dtype, dims)
    kept = shape[:len(shape) - dims]
    assert tuple(out.shape) == kept + tuple(padded_width(n) for n in shape[len(shape) - dims:])
    assert out.dtype == dtype and is_aligned(out)
    lead = tuple(slice(0, n) for n in shape)
    assert torch.equal(out[lead], x.to(dtype))
    widened = torch.ones_like(out, dtype=torch.bool)
    widened[lead] = False
    assert torch.equal(out[widened], torch.zeros_like(out[widened]))


def test_zero_padded_does_not_copy_an_even_aligned_operand():
    x = torch.randn(6, 16)
    assert zero_padded(x) is x and zero_padded(torch.randn(8, 24), dims=2).shape == (8, 24)


@pytest.mark.parametrize("has_bias", [True, False])
def test_folded_activations_keep_their_values(has_bias):
    layer = TrackedLayer.of("fc", nn.Linear(16, 4, bias=has_bias))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=gen)
    mask = torch.rand(3, 5, generator=gen) > 0.4
    a = layer.fold_activations(x, mask)
    expected = torch.cat([x, torch.ones(3, 5, 1)], dim=-1) if has_bias else x
    expected = expected * mask.unsqueeze(-1)
    assert tuple(a.shape) == (3, 5, layer.folded_in)
    assert torch.equal(a, expected)
    if has_bias:  # folded width 17: its rows start at multiples of 24 elements
        assert is_aligned(a) and a.stride(1) == padded_width(17) == 24


def test_references_trace_under_torch_compile():
    """aligned() steps aside while torch.compile traces, so the PyTorch references still compile whole."""
    from trustrepair.engine.ops.ghost_dots import ghost_dots
    from trustrepair.engine.ops.projected_gradients import projected_gradient_squares_reference

    gen = torch.Generator().manual_seed(2)
    a, g = torch.randn(2, 5, 17, generator=gen), torch.randn(2, 5, 9, generator=gen)
    u = torch.randn(3, 9, 17, generator=gen)
    q_a, q_s = torch.linalg.qr(torch.randn(17, 17, generator=gen))[0], torch.linalg.qr(torch.randn(9, 9, generator=gen))[0]
    for fn, args in ((ghost_dots, (a, g, u)), (projected_gradient_squares_reference, (a, g, q_a, q_s))):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(*args), fn(*args))
