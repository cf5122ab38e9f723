"""The fit's eigendecomposition stage on a CPU (trustrepair.engine.ekfac): single-threaded eigh calls run
several at once give the bases of the same calls made one after another, and the thread count is
restored afterwards, also when a decomposition fails."""
import pytest
import torch

from trustrepair.engine import ekfac
from trustrepair.engine.distributed import map_once

CPU = torch.device("cpu")


def covariance_sums(widths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for width in widths:
        x = torch.randn(2 * width + 3, width, generator=gen, dtype=torch.float64)
        out.append((x.T @ x, 2 * width + 3))
    return out


def test_concurrent_single_threaded_eigh_equals_one_after_another():
    items = covariance_sums([37, 5, 64, 1, 20])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        workers = ekfac._eigh_workers([s for s, _ in items])
        assert workers == 2
        with ekfac._one_thread_each(CPU):
            assert torch.get_num_threads() == 1
            concurrent = map_once(lambda item: ekfac._eigenbasis(item[0], item[1], torch.float64), items,
                                  lambda item: torch.empty(item[0].shape, dtype=torch.float64), workers=workers)
            sequential = [ekfac._eigenbasis(s, n, torch.float64) for s, n in items]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for (s, n), q, r in zip(items, concurrent, sequential):
        # bit-identical under MKL on Intel CPUs; on AMD EPYC MKL's one-thread syevd differs in the last bits
        # between a worker thread and the main one, so the comparison is to float64 rounding
        assert torch.allclose(q, r, rtol=0, atol=1e-12), float((q - r).abs().max())
        cov = s / n
        values = torch.diagonal(q.T @ cov @ q)
        assert torch.allclose(q @ torch.diag(values) @ q.T, cov, rtol=0, atol=1e-10 * float(cov.abs().max()))


def test_thread_count_restored_after_a_failure():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with ekfac._one_thread_each(CPU):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
