"""map_on_streams: results in order whatever the concurrency, errors raised, every item reported."""
import threading
import time

import pytest
import torch

from trustrepair.streams import map_on_streams


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
