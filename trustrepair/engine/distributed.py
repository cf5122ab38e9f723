"""Data parallelism over ``torch.distributed`` ranks: sharding, reductions, gathers, failing together.

trustrepair does not launch processes; ``torchrun`` does. When a process group is initialised
(``torch.distributed.is_available() and torch.distributed.is_initialized()``) the fitting and scoring
functions split the training set into contiguous shards, one per rank, and combine the ranks' results
with the collectives below; without one every helper is the identity and nothing is communicated.

**Sharding** (:func:`shard_range`). Example i of n goes to the rank whose contiguous range holds it;
with n = q * W + r (W ranks), ranks 0 .. r-1 hold q + 1 examples and the others q, so shard sizes differ
by at most one and concatenating the shards in rank order gives back the original order. That is what
lets :func:`gather_rows` restore per-example scores by position alone.

**Sums** (:func:`all_reduce_sum_`). Covariance sums sum_t a_t a_t^T, Lambda sums sum_z (Q_S^T G_z Q_A)^2
and gradient sums are additive over examples, so the global sum is the sum of the ranks' partial sums.
The partial sums are reduced in float64 and cast back: each rank's float32 partial sum already carries
the rounding of adding millions of float32 products, and adding W of them in float32 would add up to
(W - 1) more roundings of relative size 2^-24 each, in an order that the backend chooses (ring or tree,
depending on W and message size). In float64 the cross-rank addition is exact to 2^-53, so the result
differs from a single-process run only by the local accumulation order, whatever W is. Token counts are
integers reduced as int64 (:func:`all_reduce_counts`): float32 counts stop being exact above 2^24
(about 17 million tokens, one modest fine-tuning set).

**Computed once** (:func:`map_once`). Eigendecompositions are not reduced but computed by one rank
each (matrices spread over ranks to balance their n^3 cost) and broadcast: ``eigh`` on different hardware or library builds may
return different eigenvectors for the same matrix (signs, rotations inside near-degenerate
eigenspaces), and Lambda is only meaningful if every rank projects onto the same basis. Broadcasting
makes the bases bitwise identical on every rank and spreads the cubic-cost decompositions over ranks.
The preconditioning of query gradients in scoring is shared the same way, one layer per rank.

**Scores** (:func:`gather_rows`). Each rank scores its shard; an all-gather (shards padded to the largest
shard size, then trimmed) gives every rank the full (n, ...) result in the original order.

**Failing together** (:func:`fail_together`). A collective waits for every rank, so a rank that raises
before reaching it leaves the others waiting. Every local stage (a pass over the shard, a file write)
runs inside ``with fail_together("stage"):``; on leaving the block all ranks all-reduce a failure flag
(this is also a barrier), and if any rank failed, every rank raises: the failing rank its own
exception, the others :class:`RankFailedError` naming the failed ranks and their error messages. A rank
that dies or hangs outside such a block is caught by the process group's timeout instead, which the
launcher sets:

    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))

(:func:`init_from_env` does this for ``torchrun``; with NCCL the timeout is enforced through
``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default in recent PyTorch). Under ``torchrun`` a rank whose
process exits also makes the launcher stop the others; ``fail_together`` is what covers callers that
catch the exception and carry on (a notebook, a retry loop), and it tells every rank which rank failed
and why. Collectives run on the CPU for gloo and on the current CUDA device for NCCL
(:func:`communication_device`).

**Side effects.** Only rank 0 writes files and shows progress bars (:func:`is_main_process`,
:func:`progress_enabled`); the other ranks wait at the ``fail_together`` that closes the write.
"""
from __future__ import annotations

import datetime
import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from trustrepair.engine.streams import map_on_streams

DEFAULT_TIMEOUT_S = 1800.0
"""Process-group timeout of :func:`init_from_env` unless ``TRUSTREPAIR_DIST_TIMEOUT`` (seconds) is set."""

T = TypeVar("T")


class RankFailedError(RuntimeError):
    """Raised on the ranks that did not fail when another rank raised inside :func:`fail_together`."""


# ----------------------------------------------------------------------------------------------------
# Who am I
# ----------------------------------------------------------------------------------------------------

def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised (even one of a single rank)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the rank that writes files and shows progress."""
    return rank() == 0


def progress_enabled(progress: bool) -> bool:
    """Whether to show a progress bar: as asked on rank 0, never on the other ranks."""
    return bool(progress) and is_main_process()


def communication_device() -> torch.device:
    """Where collective buffers live: the current CUDA device for NCCL, the CPU otherwise (gloo)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if it asks for one.

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. With
    ``WORLD_SIZE`` > 1 and no process group yet, this calls
    ``init_process_group(backend, timeout=timedelta(seconds=timeout_s))`` with backend ``"nccl"`` when
    CUDA is available (after ``torch.cuda.set_device(LOCAL_RANK)``, so ``"cuda"`` means this rank's
    GPU) and ``"gloo"`` otherwise. ``timeout_s`` defaults to ``TRUSTREPAIR_DIST_TIMEOUT`` or 1800 s: how
    long a rank waits in a collective for a rank that died or hangs before raising.

    Returns:
        True when a process group is initialised afterwards (by this call or earlier), False for a
        plain single-process run.
    Raises:
        ValueError: a malformed ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``TRUSTREPAIR_DIST_TIMEOUT`` or a
            non-positive timeout.
    """
    if is_distributed():
        return True
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return False
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 asks for several processes, but this PyTorch build has no "
                         "torch.distributed; install a build with distributed support or run one process")
    if timeout_s is None:
        raw = os.environ.get("TRUSTREPAIR_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ValueError(f"TRUSTREPAIR_DIST_TIMEOUT must be a number of seconds; got {raw!r}") from None
    if not timeout_s > 0:
        raise ValueError(f"the process-group timeout must be a positive number of seconds; got {timeout_s}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {raw!r}") from None


# ----------------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------------

def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """Contiguous indices of rank ``rank_``'s shard of n items among ``world`` ranks.

    With n = q * world + r: rank k < r gets [k (q + 1), (k + 1)(q + 1)), rank k >= r gets
    [r (q + 1) + (k - r) q, ... + q). Shards are disjoint, cover range(n) in rank order, and differ in
    size by at most one; a rank gets an empty range when n < world. Defaults: this process's rank and
    the world size.

    Raises:
        ValueError: negative n, world < 1, or a rank outside [0, world).
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if n < 0:
        raise ValueError(f"cannot shard a negative number of items ({n})")
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"rank must be in [0, world) with world >= 1; got rank {rank_}, world {world}")
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return range(start, start + base + (1 if rank_ < extra else 0))


# ----------------------------------------------------------------------------------------------------
# Failure propagation
# ----------------------------------------------------------------------------------------------------

@contextmanager
def fail_together(what: str) -> Iterator[None]:
    """Run a local stage so that if any rank raises in it, every rank raises (no rank hangs).

    On exit (normal or by an exception) every rank all-reduces a (world,) int64 flag vector with a 1 at
    the index of each failed rank; if any is set, the ranks' error messages are all-gathered, the
    failing ranks re-raise their own exception and the others raise :class:`RankFailedError`. Every
    rank must enter and leave the same ``fail_together`` blocks in the same order (they are collective
    calls); a block must not contain collectives of its own, since a failed rank would skip them.
    Without a process group this is a no-op. ``KeyboardInterrupt`` and ``SystemExit`` are not caught:
    the other ranks then see the process-group timeout or a closed connection.

    Args:
        what: names the stage in the error message, e.g. ``"the EK-FAC covariance pass"``.
    """
    if not is_distributed():
        yield
        return
    try:
        yield
    except Exception as error:
        _agree_on_failure(what, error)
        raise
    _agree_on_failure(what, None)


def _agree_on_failure(what: str, error: Exception | None) -> None:
    flags = torch.zeros(world_size(), dtype=torch.int64, device=communication_device())
    if error is not None:
        flags[rank()] = 1
    dist.all_reduce(flags)
    failed = flags.nonzero().flatten().tolist()
    if not failed:
        return
    messages: list = [None] * world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is None:
        details = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise RankFailedError(f"{what} failed on rank(s) {failed} of {world_size()}, so rank {rank()} stops too "
                              f"({details}); see the failed rank's traceback for the cause")


# ----------------------------------------------------------------------------------------------------
# Collectives
# ----------------------------------------------------------------------------------------------------

def all_reduce_sum_(tensors: Sequence[torch.Tensor], reduce_dtype: torch.dtype | None = torch.float64
                    ) -> Sequence[torch.Tensor]:
    """Replace each tensor, in place, by its sum over ranks.

    Floating-point tensors are summed in ``reduce_dtype`` (float64 by default, see the module docstring)
    and cast back to their own dtype; ``reduce_dtype=None`` sums in their own dtype. Integer tensors are
    summed as they are. Without a process group the tensors are returned unchanged.

    Returns:
        ``tensors`` (the same objects).
    """
    if not is_distributed():
        return tensors
    device = communication_device()
    for tensor in tensors:
        dtype = reduce_dtype if (tensor.is_floating_point() and reduce_dtype is not None) else tensor.dtype
        buffer = tensor.detach().to(device=device, dtype=dtype, copy=True)
        dist.all_reduce(buffer)
        tensor.copy_(buffer)
    return tensors


def all_reduce_counts(counts: Sequence[int]) -> list[int]:
    """Sum integer counts (tokens, examples) over ranks, exactly (as one int64 tensor)."""
    if not is_distributed():
        return list(counts)
    buffer = torch.tensor(list(counts), dtype=torch.int64, device=communication_device())
    dist.all_reduce(buffer)
    return buffer.tolist()


def require_agreement(flag: bool, problem: str) -> bool:
    """Return ``flag`` if every rank has the same one; otherwise raise ``ValueError`` on every rank.

    For decisions each rank makes from what it sees locally (e.g. whether a checkpoint file exists)
    that must not diverge, or the ranks would run different collectives and hang.

    Args:
        flag: this rank's decision.
        problem: what a disagreement means and how to fix it, for the error message.
    """
    if not is_distributed():
        return flag
    yes = all_reduce_counts([int(bool(flag))])[0]
    if 0 < yes < world_size():
        raise ValueError(f"{problem} ({yes} of {world_size()} ranks said yes; this is rank {rank()}, which "
                         f"said {'yes' if flag else 'no'})")
    return flag


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> Sequence[torch.Tensor]:
    """Overwrite each tensor, in place, with rank ``src``'s values (bitwise). Returns ``tensors``.

    A contiguous tensor already on :func:`communication_device` is broadcast in place; any other goes
    through a temporary copy there."""
    if not is_distributed():
        return tensors
    device = communication_device()
    for tensor in tensors:
        if tensor.device == device and tensor.is_contiguous():
            dist.broadcast(tensor.detach(), src)
            continue
        buffer = tensor.detach().to(device=device, copy=True)
        dist.broadcast(buffer, src)
        tensor.copy_(buffer)
    return tensors


def owners(costs: Sequence[float], world: int) -> list[int]:
    """Deterministic balanced assignment of items to ranks: items in decreasing cost (ties: lower index
    first) each go to the rank with the least cost so far (ties: lower rank). Equal costs give the
    round-robin i -> i mod ``world``. Returns the owning rank of each item."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += costs[i]
    return owner


def map_once(fn: Callable[[T], torch.Tensor], items: Sequence[T], like: Callable[[T], torch.Tensor],
             cost: Callable[[T], float] | None = None, desc: str = "", progress: bool = False,
             workers: int = 1) -> list[torch.Tensor]:
    """[fn(item) for item in items], each computed by one rank and broadcast from it.

    Items are spread over ranks by :func:`owners` (balanced by ``cost(item)``, round-robin without it).
    Every rank gets bitwise-identical results. A failure of ``fn`` on any rank makes every rank raise
    (the computation runs inside :func:`fail_together`).

    Args:
        fn: the computation; its result must have the shape and dtype of ``like(item)``.
        items: inputs, the same on every rank.
        like: an empty tensor of the result's shape, dtype and device (the receiving buffer).
        cost: relative cost of ``fn(item)`` (e.g. its flop count), the same on every rank.
        desc, progress: a tqdm bar over this rank's items (shown on rank 0 only).
        workers: this rank's items computed up to ``workers`` at a time, most expensive first, each on
            its own CUDA stream (:func:`trustrepair.engine.streams.map_on_streams`); results do not depend on it.
    """
    world, me = world_size(), rank()
    costs = [1.0 if cost is None else float(cost(item)) for item in items]
    owner = owners(costs, world)
    results: list[torch.Tensor | None] = [None] * len(items)
    with fail_together(desc or "a computation shared between ranks"):
        mine = sorted((i for i in range(len(items)) if owner[i] == me), key=lambda i: -costs[i])
        bar = tqdm(total=len(mine), desc=desc, unit="item", disable=not progress_enabled(progress))
        lock = threading.Lock()

        def advance():
            with lock:
                bar.update()

        # Only concurrent work needs the device (for its streams); like() allocates, so ask it only then.
        device = like(items[mine[0]]).device if mine and workers > 1 else torch.device("cpu")
        with bar:
            computed = map_on_streams(fn, [items[i] for i in mine], device, workers, on_done=advance)
        for i, result in zip(mine, computed):
            results[i] = result
            expected = like(items[i])
            if results[i].shape != expected.shape or results[i].dtype != expected.dtype:
                raise ValueError(f"map_once: fn returned {tuple(results[i].shape)} {results[i].dtype} for item {i}, "
                                 f"but like() promised {tuple(expected.shape)} {expected.dtype}")
    if world == 1:
        return results
    for i in range(len(items)):
        if results[i] is None:
            results[i] = like(items[i])
        broadcast_([results[i]], src=owner[i])
    return results


def gather_rows(local: torch.Tensor, n_total: int) -> torch.Tensor:
    """All-gather row shards (rank k holds rows :func:`shard_range` (n_total, k)) into (n_total, ...) rows
    in the original order, on every rank.

    Shards differ in length by at most one, so each is padded to the largest shard length
    ceil(n_total / W) for the all-gather and trimmed after. Returns a tensor on ``local``'s device and
    dtype; without a process group, ``local`` itself (which must have n_total rows).

    Raises:
        ValueError: ``local`` does not have this rank's shard length.
    """
    expected = len(shard_range(n_total))
    if local.dim() == 0 or local.shape[0] != expected:
        raise ValueError(f"rank {rank()} holds {tuple(local.shape)} but its shard of {n_total} rows over "
                         f"{world_size()} ranks has {expected} rows; pass the rows of shard_range(n_total)")
    if not is_distributed():
        return local
    world = world_size()
    width = -(-n_total // world)
    device = communication_device()
    padded = local.new_zeros((width, *local.shape[1:]), device=device)
    padded[:expected] = local.to(device)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    rows = [pieces[k][:len(shard_range(n_total, k, world))] for k in range(world)]
    return torch.cat(rows).to(local.device)
