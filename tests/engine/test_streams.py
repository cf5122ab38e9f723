"""map_on_streams: results in order whatever the concurrency, errors raised, every item reported."""
import threading
import time

import pytest
import torch

from trustrepair.engine.streams import map_on_streams


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_results_in_order_and_equal_to_a_loop(device, workers):
    """On CUDA each worker has its own stream: the eigenvectors must still equal one-at-a-time ones."""
    gen = torch.Generator().manual_seed(0)
    mats = [(x @ x.T).double().to(device) for x in (torch.randn(n, n, generator=gen) for n in (33, 9, 17, 1, 40))]
    done = []
    out = map_on_streams(lambda m: torch.linalg.eigh(m)[1], mats, torch.device(device), workers,
                         on_done=lambda: done.append(1))
    assert len(done) == len(mats)
    for m, vectors in zip(mats, out):
        assert torch.equal(vectors, torch.linalg.eigh(m)[1])


def test_items_really_overlap_on_threads():
    """With two workers, two items are in flight at once (each waits for the other to start)."""
    started = [threading.Event(), threading.Event()]

    def fn(k):
        started[k].set()
        assert started[1 - k].wait(timeout=10), "the items ran one after another"
        return torch.tensor(float(k))

    out = map_on_streams(fn, [0, 1], torch.device("cpu"), workers=2)
    assert [float(x) for x in out] == [0.0, 1.0]


def test_an_error_stops_new_items_and_is_raised():
    seen = []

    def fn(k):
        seen.append(k)
        if k == 0:
            raise RuntimeError("item 0 failed")
        time.sleep(0.01)
        return torch.tensor(float(k))

    with pytest.raises(RuntimeError, match="item 0 failed"):
        map_on_streams(fn, list(range(50)), torch.device("cpu"), workers=2)
    assert len(seen) < 50, "the workers kept taking items after the failure"


@pytest.mark.gpu
def test_narrow_factors_on_the_host_match_the_device():
    """The eigh_host_below setting: CUDA factors narrower than it are eigendecomposed on the host, from concurrent
    worker streams too; the eigenvectors come back to the device orthonormal and diagonalise the matrix
    to the device solver's eigenvalues."""
    from trustrepair.engine import ekfac
    from trustrepair.engine.tunables import override

    gen = torch.Generator(device="cuda").manual_seed(5)
    mats = []
    for n in (130, 70, 33):
        x = torch.randn(2 * n, n, generator=gen, dtype=torch.float64, device="cuda")
        mats.append(x.T @ x / (2 * n))
    device_values = [ekfac.eigh_float64(m)[0] for m in mats]
    with override(eigh_host_below=100):  # 70 and 33 on the host, 130 on the device
        mixed = map_on_streams(lambda m: ekfac.eigh_float64(m)[1], mats, torch.device("cuda"), 3)
    for m, values, vectors in zip(mats, device_values, mixed):
        assert vectors.is_cuda and vectors.dtype == torch.float64
        eye = torch.eye(m.shape[0], dtype=torch.float64, device="cuda")
        torch.testing.assert_close(vectors.T @ vectors, eye, atol=1e-12, rtol=0)
        torch.testing.assert_close(vectors.T @ m @ vectors, torch.diag(values), atol=1e-12 * float(values.abs().max()),
                                   rtol=0)


@pytest.mark.gpu
def test_first_cuda_linalg_call_of_a_process_from_many_workers():
    """torch loads its CUDA linear-algebra library at the first linalg call; worker threads racing to make
    that first call fail (pytorch/pytorch#90613) unless map_on_streams loads it first. Needs a fresh
    process: this one has already made such calls."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from trustrepair.engine.streams import map_on_streams\n"
        "gen = torch.Generator().manual_seed(0)\n"
        "mats = [(x @ x.T).double().cuda() for x in (torch.randn(n, n, generator=gen) for n in (300, 200, 100, 50) * 2)]\n"
        "out = map_on_streams(lambda m: torch.linalg.eigh(m)[1], mats, torch.device('cuda'), workers=4)\n"
        "assert all(torch.equal(v, torch.linalg.eigh(m)[1]) for m, v in zip(mats, out))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
