"""trustrepair.engine.ops.routing: the one rule that sends an operation to its Triton kernel, and the
eigenvalue correction's dispatcher on both sides of it (the kernel replaced by a stub here; the kernel
itself is tested in tests/kernels)."""
import sys
import types

import pytest
import torch
from ops_cases import assert_close, naive_squares, operands

from benchmarks.common import matmul_precision
from trustrepair.engine.ops import projected_gradients as PG
from trustrepair.engine.ops import routing
from trustrepair.engine.tunables import current, override


@pytest.fixture
def tf32():
    """TF32 float32 matmuls for the test (float32 then computes in a tensor-core precision)."""
    with matmul_precision("high"):
        yield


@pytest.fixture
def stub_kernel(monkeypatch):
    """Triton enabled for every tensor, and the squares kernel replaced by a stub recording its calls."""
    calls = []
    module = types.ModuleType("trustrepair.kernels.projected_gradients")

    def squares(*args):
        calls.append(args)
        return torch.full((args[1].shape[2], args[0].shape[2]), 7.0)

    module.projected_gradient_squares_triton = squares
    monkeypatch.setitem(sys.modules, "trustrepair.kernels.projected_gradients", module)
    monkeypatch.setattr(routing, "triton_enabled", lambda tensor: True)
    return calls


def test_triton_enabled_only_for_cuda_with_triton_and_no_override(monkeypatch):
    cuda_like = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(routing, "triton_importable", lambda: True)
    monkeypatch.delenv("TRUSTREPAIR_DISABLE_TRITON", raising=False)
    assert routing.triton_enabled(cuda_like)
    assert not routing.triton_enabled(torch.zeros(1))
    monkeypatch.setenv("TRUSTREPAIR_DISABLE_TRITON", "1")
    assert not routing.triton_enabled(cuda_like)
    monkeypatch.delenv("TRUSTREPAIR_DISABLE_TRITON")
    monkeypatch.setattr(routing, "triton_importable", lambda: False)
    assert not routing.triton_enabled(cuda_like)


def test_only_tensor_core_dtypes_go_to_triton(tf32):
    """bfloat16, float16 and TF32 float32 run kernels; float64 and exact float32 run the reference."""
    assert routing.tensor_core_dtype(torch.bfloat16) and routing.tensor_core_dtype(torch.float16)
    assert routing.tensor_core_dtype(torch.float32) and not routing.tensor_core_dtype(torch.float64)
    torch.set_float32_matmul_precision("highest")
    assert not routing.tensor_core_dtype(torch.float32)


def test_only_the_ops_in_triton_ops_go_to_triton(stub_kernel, tf32):
    """With Triton enabled, the eigenvalue correction goes to its kernel exactly when it is in triton_ops
    and its operands compute in a tensor-core precision; otherwise it gives the reference's results."""
    assert current().triton_ops == {"projected_gradient_squares"}
    a, g, q_a, q_s, _ = operands((2, 3, 5, 4), dtype=torch.float32)
    assert routing.uses_triton("projected_gradient_squares", a, g, q_a, q_s)
    assert torch.equal(PG.projected_gradient_squares(a, g, q_a, q_s), torch.full((4, 5), 7.0))
    assert len(stub_kernel) == 1
    with override(triton_ops=frozenset()):
        assert not routing.uses_triton("projected_gradient_squares", a, g, q_a, q_s)
        assert_close(PG.projected_gradient_squares(a, g, q_a, q_s), naive_squares(a, g, q_a, q_s), 1e-5,
                     "squares on the reference")
    a64, g64, q_a64, q_s64, _ = operands((2, 3, 5, 4))
    assert not routing.uses_triton("projected_gradient_squares", a64, g64, q_a64, q_s64), "float64: the reference"
    assert_close(PG.projected_gradient_squares(a64, g64, q_a64, q_s64), naive_squares(a64, g64, q_a64, q_s64), 1e-12,
                 "float64 on the reference")
    assert len(stub_kernel) == 1


@pytest.mark.parametrize("pad", [False, True])
def test_dispatcher_hands_the_kernel_aligned_or_zero_padded_operands(stub_kernel, tf32, pad):
    """The library lays out the kernel's operands: in the operand dtype with aligned rows, or zero-padded
    to aligned widths (bases on both sides) where pad_widths is on; the result is cut to (d_out, d_in)."""
    from trustrepair.engine.layout import is_aligned

    a, g, q_a, q_s, _ = operands((2, 3, 17, 9), dtype=torch.float32)
    with override(pad_widths={"cpu": pad}):
        out = PG.projected_gradient_squares(a.bfloat16(), g, q_a, q_s)
    (ka, kg, kq_a, kq_s), = stub_kernel
    assert out.shape == (9, 17)
    assert all(t.dtype == torch.float32 and is_aligned(t) for t in (ka, kg, kq_a, kq_s))
    widths = (24, 16) if pad else (17, 9)
    assert ka.shape[2] == kq_a.shape[0] == kq_a.shape[1] == widths[0]
    assert kg.shape[2] == kq_s.shape[0] == kq_s.shape[1] == widths[1]
    if pad:
        assert not ka[..., 17:].any() and not kq_a[17:].any() and not kq_a[:, 17:].any()
        assert torch.equal(kq_s[:9, :9], q_s)


def test_triton_ops_names_only_operations_with_a_kernel():
    assert set(routing.KERNELS) == {"projected_gradient_squares"}
    with pytest.raises(ValueError, match="without a Triton kernel"):
        with override(triton_ops=frozenset({"ghost_dots"})):
            pass
