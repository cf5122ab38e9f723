"""trustrepair.engine.ops.gram: the upper block triangle of x^T x and its symmetric completion."""
import pytest
import torch
from ops_cases import assert_close

from trustrepair.engine.ops.gram import add_gram_upper_, symmetric_from_upper
from trustrepair.engine.tunables import override


@pytest.mark.parametrize("rows, width, block", [(1, 1, 256), (7, 17, 4), (33, 65, 16), (5, 300, 256), (0, 9, 4)])
def test_gram_upper_and_symmetrisation_equal_the_full_product(rows, width, block):
    gen = torch.Generator().manual_seed(rows + width)
    x = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    start = torch.randn(width, width, generator=gen, dtype=torch.float64)
    start = start + start.T
    out = add_gram_upper_(start.clone(), x, block=block)
    assert_close(symmetric_from_upper(out), start + x.T @ x, 1e-13, "upper-triangle Gram")
    below = torch.tril(torch.ones(width, width, dtype=torch.bool), diagonal=-block)
    assert torch.equal(out[below], start[below]), "entries below the diagonal blocks must be untouched"
    with pytest.raises(ValueError, match="add_gram_upper_ needs"):
        add_gram_upper_(torch.zeros(width + 1, width + 1, dtype=torch.float64), x)
    with pytest.raises(ValueError, match="block width >= 1"):
        add_gram_upper_(start.clone(), x, block=0)


def test_gram_upper_default_block_is_the_setting():
    """The gram_block setting (chosen per device class from gpu_check's timings) sets the default block;
    None is one block, the full product."""
    x = torch.randn(6, 10, dtype=torch.float64)
    with override(gram_block={"cpu": 3}):
        out = add_gram_upper_(torch.zeros(10, 10, dtype=torch.float64), x)
    assert out[9, 0] == 0 and out[3, 2] == 0 and out[2, 0] != 0, "block 3: only the diagonal blocks of 3 rows"
    with override(gram_block={"cpu": None}):
        out = add_gram_upper_(torch.zeros(10, 10, dtype=torch.float64), x)
    torch.testing.assert_close(out, x.T @ x, rtol=1e-13, atol=1e-13)
