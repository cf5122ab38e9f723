"""Data parallelism over torch.distributed: sharding, collectives, failing together, and the EK-FAC
engine run on 2 gloo ranks against the single-process results.

Multi-process tests start real processes (gloo backend, a FileStore rendezvous in a temporary folder, so
no port is needed) and give every run a wall-clock deadline: a hang fails the test instead of blocking it.
The processes are forked, so they inherit the imported torch and transformers (spawning costs about 8 s
of imports per process on the 2-core CI machine); each runs torch with one thread, which keeps the
OpenMP thread pool, not fork-safe, out of use in the children.
"""
import datetime
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trustrepair.engine import distributed as D

WORLD = 2

# Python 3.12 warns on every fork of a multi-threaded parent (see the module docstring for why it is safe)
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


# ----------------------------------------------------------------------------------------------------
# Harness
# ----------------------------------------------------------------------------------------------------

def _entry(worker, rank, world, folder, pg_timeout_s, port, kwargs):
    torch.set_num_threads(1)
    if port is None:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
    else:  # the environment torchrun sets, read by init_from_env
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world), TRUSTREPAIR_DIST_TIMEOUT=str(pg_timeout_s))
        assert D.init_from_env(backend="gloo")  # NCCL would need one GPU per rank
    start = time.perf_counter()
    try:
        out = {"value": worker(**kwargs)}
    except Exception as error:  # reported to the parent, which asserts on it
        out = {"error": type(error).__name__, "message": str(error)}
    out["seconds"] = time.perf_counter() - start
    torch.save(out, Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(worker, world=WORLD, deadline_s=60.0, pg_timeout_s=30.0, torchrun_env=False, start_method="fork",
              **kwargs) -> list[dict]:
    """Run ``worker(**kwargs)`` on ``world`` forked gloo ranks; per rank {"value"} or {"error", "message"}
    (plus "seconds"), or {"exitcode"} for a rank that died without reporting. Fails on a hang. With
    ``torchrun_env`` the ranks join through :func:`D.init_from_env` and torchrun's variables (TCP store
    on a free local port) instead of a FileStore. CUDA work needs ``start_method="spawn"`` (a forked
    child cannot use CUDA once the parent has)."""
    port = None
    if torchrun_env:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    context = mp.get_context(start_method)
    with tempfile.TemporaryDirectory() as folder:
        procs = [context.Process(target=_entry, args=(worker, r, world, folder, pg_timeout_s, port, kwargs))
                 for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        assert not hung, f"ranks {hung} still running after {deadline_s} s (a hang)"
        results = []
        for r, p in enumerate(procs):
            path = Path(folder) / f"rank{r}.pt"
            results.append(torch.load(path, weights_only=False) if path.exists() else {"exitcode": p.exitcode})
        return results


def values(results):
    errors = [(r, out) for r, out in enumerate(results) if "value" not in out]
    assert not errors, f"ranks failed: {errors}"
    return [out["value"] for out in results]


# ----------------------------------------------------------------------------------------------------
# Sharding and the single-process identities
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 16, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_range_partitions_contiguously_with_remainder_first(n, world):
    shards = [D.shard_range(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the remainder goes to the first ranks
    assert all(s.step == 1 for s in shards)


def test_owners_balance_costs_deterministically():
    assert D.owners([1.0] * 7, 3) == [0, 1, 2, 0, 1, 2, 0]  # equal costs: round-robin
    # largest first, each to the least-loaded rank: 8 -> r0; 5 -> r1; 4 -> r1 (load 9); 3 -> r0 (load 11)
    assert D.owners([3.0, 8.0, 4.0, 5.0], 2) == [0, 0, 1, 1]
    costs = torch.rand(40, generator=torch.Generator().manual_seed(0)).tolist()
    owner = D.owners(costs, 3)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(costs)  # greedy largest-first bound
    assert D.owners([], 2) == [] and D.owners([2.0], 4) == [0]


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="negative"):
        D.shard_range(-1, 0, 2)
    with pytest.raises(ValueError, match="rank must be in"):
        D.shard_range(4, 2, 2)
    with pytest.raises(ValueError, match="rank must be in"):
        D.shard_range(4, 0, 0)


def test_without_process_group_everything_is_local():
    assert not D.is_distributed()
    assert (D.rank(), D.world_size(), D.is_main_process()) == (0, 1, True)
    assert D.progress_enabled(True) and not D.progress_enabled(False)
    assert D.shard_range(5) == range(5)
    t = torch.arange(3.0)
    assert D.all_reduce_sum_([t])[0] is t and torch.equal(t, torch.arange(3.0))
    assert D.all_reduce_counts([3, 4]) == [3, 4]
    assert D.gather_rows(t, 3) is t
    with pytest.raises(ValueError, match="shard of 4 rows"):
        D.gather_rows(t, 4)
    out = D.map_once(lambda x: x * 2, [t, t + 1], lambda x: torch.empty_like(x))
    assert torch.equal(out[1], (t + 1) * 2)
    concurrent = D.map_once(lambda x: x * 2, [t, t + 1, t + 2], lambda x: torch.empty_like(x), workers=2)
    assert all(torch.equal(c, (t + k) * 2) for k, c in enumerate(concurrent))
    with pytest.raises(ValueError, match="like\\(\\) promised"):
        D.map_once(lambda x: x[:1], [t], lambda x: torch.empty_like(x))
    assert D.require_agreement(False, "unused") is False
    with pytest.raises(KeyError):
        with D.fail_together("a local stage"):
            raise KeyError("local errors pass through unchanged")


def test_init_from_env_is_a_no_op_for_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_from_env() is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.init_from_env() is False
    assert not D.is_distributed()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        D.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TRUSTREPAIR_DIST_TIMEOUT", "-3")
    with pytest.raises(ValueError, match="positive number of seconds"):
        D.init_from_env()


# ----------------------------------------------------------------------------------------------------
# Collectives on 2 ranks
# ----------------------------------------------------------------------------------------------------

def _collectives_worker(row_counts):
    me, world = D.rank(), D.world_size()
    out = {"rank": me, "world": world, "main": D.is_main_process(), "progress": D.progress_enabled(True)}
    # float32 partial sums 1, 0.75 * 2^-24 and 1 + 2^-23: every float32 summation order gives 2, the
    # float64 sum rounds to 2 + 2^-22 (the correctly rounded float32 result).
    part = torch.full((3, 2), [1.0, 0.75 * 2.0 ** -24, 1.0 + 2.0 ** -23][me], dtype=torch.float32)
    wide = torch.full((3, 2), 1.0 + me * 2.0 ** -40, dtype=torch.float64)
    ints = torch.tensor([me + 1, 10 * me], dtype=torch.int64)
    D.all_reduce_sum_([part, wide, ints])
    out.update(part=part, wide=wide, ints=ints, counts=D.all_reduce_counts([2 ** 40 + me, me]))
    out["agreed"] = D.require_agreement(True, "unused")
    try:
        D.require_agreement(me == 1, "ranks see different checkpoints")
    except ValueError as error:
        out["disagreement"] = str(error)
    # broadcast and map_once: results computed on one rank are bitwise identical everywhere
    noise = torch.randn(4, generator=torch.Generator().manual_seed(100 + me), dtype=torch.float64)
    out["noise"] = noise.clone()
    out["broadcast"] = D.broadcast_([noise], src=1)[0]
    items = [torch.full((2, 2), float(i)) for i in range(5)]
    out["mapped"] = D.map_once(lambda x: x + D.rank() * 1000, items, lambda x: torch.empty_like(x))
    out["weighted"] = D.map_once(lambda x: x + D.rank() * 1000, items, lambda x: torch.empty_like(x),
                                 cost=lambda x: float(x[0, 0]) ** 2)
    out["concurrent"] = D.map_once(lambda x: x + D.rank() * 1000, items, lambda x: torch.empty_like(x),
                                   cost=lambda x: float(x[0, 0]) ** 2, workers=3)
    # per-row scores of this rank's shard, gathered back into the original order (shards of 7 rows:
    # 3, 2, 2; of 2 rows: 1, 1, 0; of 1 row: 1, 0, 0)
    out["gathered"] = []
    for n_rows in row_counts:
        shard = D.shard_range(n_rows)
        local = torch.tensor([[float(i), -float(i)] for i in shard], dtype=torch.float64).reshape(len(shard), 2)
        out["gathered"].append(D.gather_rows(local, n_rows))
    return out


def test_collectives_on_three_ranks():
    row_counts = [7, 2, 1]
    results = values(run_ranks(_collectives_worker, world=3, row_counts=row_counts))
    assert [(r["rank"], r["world"], r["main"], r["progress"]) for r in results] == [
        (0, 3, True, True), (1, 3, False, False), (2, 3, False, False)]
    for r in results:
        assert r["part"].dtype == torch.float32
        assert torch.equal(r["part"], torch.full((3, 2), 2.0 + 2.0 ** -22))
        assert torch.equal(r["wide"], torch.full((3, 2), 3.0 + 3 * 2.0 ** -40, dtype=torch.float64))
        assert torch.equal(r["ints"], torch.tensor([6, 30]))
        assert r["counts"] == [3 * 2 ** 40 + 3, 3]
        assert r["agreed"] is True
        assert r["disagreement"].startswith("ranks see different checkpoints (1 of 3 ranks said yes")
        assert torch.equal(r["broadcast"], results[1]["noise"])
        for i, m in enumerate(r["mapped"]):  # item i computed by rank i % 3
            assert torch.equal(m, torch.full((2, 2), float(i) + 1000 * (i % 3)))
        owner = D.owners([float(i) ** 2 for i in range(5)], 3)  # [2, 2, 2, 1, 0]
        for i, m in enumerate(r["weighted"]):
            assert torch.equal(m, torch.full((2, 2), float(i) + 1000 * owner[i]))
        for weighted, concurrent in zip(r["weighted"], r["concurrent"]):  # rank 2's three items on 3 threads
            assert torch.equal(weighted, concurrent)
        for n_rows, gathered in zip(row_counts, r["gathered"]):
            expected = torch.tensor([[float(i), -float(i)] for i in range(n_rows)], dtype=torch.float64)
            assert torch.equal(gathered, expected.reshape(n_rows, 2))


def _identity_worker():
    return D.is_distributed(), D.rank(), D.world_size(), dist.get_backend(), D.init_from_env()


def test_init_from_env_joins_the_torchrun_rendezvous():
    assert values(run_ranks(_identity_worker, torchrun_env=True)) == [(True, 0, 2, "gloo", True),
                                                                     (True, 1, 2, "gloo", True)]


def _failing_worker(failing_rank, stage_after):
    """Fails on ``failing_rank`` inside a fail_together stage; the other rank would next run a collective."""
    with D.fail_together("the test stage"):
        if D.rank() == failing_rank:
            raise IndexError("index 97 is out of range (bad token id in this rank's shard)")
    if stage_after:
        D.all_reduce_sum_([torch.ones(3)])
    return "finished"


def test_a_rank_that_fails_makes_every_rank_raise():
    results = run_ranks(_failing_worker, deadline_s=60, pg_timeout_s=60, failing_rank=1, stage_after=True)
    assert results[1]["error"] == "IndexError"
    assert results[0]["error"] == "RankFailedError"
    assert "the test stage failed on rank(s) [1] of 2" in results[0]["message"]
    assert "IndexError: index 97 is out of range" in results[0]["message"]
    assert all(r["seconds"] < 20 for r in results)  # promptly, not by the 60 s process-group timeout


def _hanging_worker(hang_s):
    if D.rank() == 1:
        time.sleep(hang_s)  # stuck outside any fail_together block
        return "woke up"
    D.all_reduce_sum_([torch.ones(3)])
    return "reduced"


def test_a_rank_that_hangs_outside_a_stage_is_caught_by_the_process_group_timeout():
    results = run_ranks(_hanging_worker, deadline_s=60, pg_timeout_s=1, hang_s=5)
    assert "Timed out" in results[0].get("message", ""), results[0]
    assert results[0]["seconds"] < 4  # the 1 s timeout fired well before rank 1 woke up


# ----------------------------------------------------------------------------------------------------
# The EK-FAC engine on 2 ranks equals the single-process engine (one 2-rank run shared by these tests)
# ----------------------------------------------------------------------------------------------------

N_TRAIN = 7            # shards of 4 and 3 examples: not divisible by the world size
UNLABELLED = 5         # in rank 1's shard: an example without a labelled token (scores exactly 0)


def _engine_inputs():
    from conftest import make_examples, make_queries, make_tiny_neox

    model = make_tiny_neox(seed=3)
    examples = make_examples(N_TRAIN, seed=21)
    examples[UNLABELLED] = {"input_ids": examples[UNLABELLED]["input_ids"],
                            "labels": torch.full_like(examples[UNLABELLED]["labels"], -100)}
    trust = {"truthfulness": make_queries(3, seed=22), "ethics": make_queries(2, seed=23)}
    queries = make_queries(5, seed=24)
    return model, examples, trust, queries


def _engine_outputs(folder=None):
    """Factors, aggregated and pairwise scores (exact and rank-1) of the engine inputs; with ``folder``
    also a save / load, a checkpointed sampled fit resumed, and a fit whose rank-1 shard is broken."""
    import warnings

    from trustrepair import EKFACFactors, fit_ekfac, influence, pairwise_influence

    model, examples, trust, queries = _engine_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unlabelled example's warning
        factors = fit_ekfac(model, examples, fisher="empirical", batch_size=3, progress=False)
        probes = {name: torch.randn(f.lambda_.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                  for i, (name, f) in enumerate(factors.modules.items())}
        out = {
            "factors": {name: (f.q_a, f.q_s, f.lambda_, f.n_tokens, f.n_examples) for name, f in factors.modules.items()},
            # (G + lambda I)^-1 V on fixed probes: unlike the eigenvectors it does not depend on the basis
            # chosen inside degenerate eigenspaces (A and S are rank-deficient here: fewer tokens than d)
            "preconditioned": factors.precondition(probes),
            "aggregated": influence(model, factors, examples, trust, batch_size=3, progress=False),
            "pairwise": pairwise_influence(model, factors, examples, queries, batch_size=2, progress=False),
            "low_rank": pairwise_influence(model, factors, examples, queries, query_rank=1, batch_size=2,
                                           progress=False),
        }
        if folder is None:
            return out
        # only rank 0 writes; every rank can read the files once save() returns
        factors.save(Path(folder) / "factors")
        out["loaded_lambda"] = EKFACFactors.load(Path(folder) / "factors", model).modules
        # a covariance checkpoint written during a fit is resumed by every rank
        first = fit_ekfac(model, examples, fisher="sampled", batch_size=3, progress=False,
                          checkpoint_dir=Path(folder) / "partial")
        again = fit_ekfac(model, examples, fisher="sampled", batch_size=3, progress=False,
                          checkpoint_dir=Path(folder) / "partial")
        out["resumed"] = ("covariance" in first.timings, "covariance" in again.timings,
                          all(torch.equal(first.modules[n].lambda_, again.modules[n].lambda_) for n in first.modules))
        out["sampled_lambda"] = {n: f.lambda_ for n, f in first.modules.items()}
        # last: token id 500 >= vocabulary 97 in example 6, which is in rank 1's shard
        examples[6] = {"input_ids": torch.tensor([1, 2, 500, 3]), "labels": torch.tensor([-100, -100, 500, 3])}
        try:
            fit_ekfac(model, examples, fisher="empirical", batch_size=3, progress=False)
        except Exception as error:
            out["bad_shard"] = (type(error).__name__, str(error))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """(outputs of rank 0 and rank 1, single-process outputs)."""
    folder = tmp_path_factory.mktemp("two_ranks")
    return values(run_ranks(_engine_outputs, deadline_s=150, folder=str(folder))), _engine_outputs()


def _relative_error(got, want):
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def test_factors_on_two_ranks_equal_one_process(two_ranks):
    results, want = two_ranks
    for r, got in enumerate(results):
        for name, (q_a, q_s, lam, n_tokens, n_examples) in want["factors"].items():
            g_a, g_s, g_lam, g_tokens, g_examples = got["factors"][name]
            assert (g_tokens, g_examples) == (n_tokens, n_examples) == (n_tokens, N_TRAIN)
            assert _relative_error(g_lam, lam) <= 1e-6, (r, name)
            assert _relative_error(got["preconditioned"][name], want["preconditioned"][name]) <= 1e-6, (r, name)
            for q in (g_a, g_s):  # orthonormal bases
                assert _relative_error(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype)) <= 1e-12
    for name, tensors in results[0]["factors"].items():  # bitwise the same on both ranks
        assert all(torch.equal(a, b) for a, b in zip(tensors[:3], results[1]["factors"][name][:3])), name


def test_scores_on_two_ranks_equal_one_process_in_the_original_order(two_ranks):
    results, want = two_ranks
    for r, got in enumerate(results):
        for aspect, scores in want["aggregated"].items():
            assert got["aggregated"][aspect].shape == (N_TRAIN,)
            assert _relative_error(got["aggregated"][aspect], scores) <= 1e-6, (r, aspect)
            assert got["aggregated"][aspect][UNLABELLED] == 0
        for key in ("pairwise", "low_rank"):
            assert got[key].shape == want[key].shape == (5, N_TRAIN)
            assert _relative_error(got[key], want[key]) <= 1e-6, (r, key)
            assert bool((got[key][:, UNLABELLED] == 0).all())
    for key in ("pairwise", "low_rank"):
        assert torch.equal(results[0][key], results[1][key])
    for aspect in want["aggregated"]:
        assert torch.equal(results[0]["aggregated"][aspect], results[1]["aggregated"][aspect])


def test_save_and_checkpoint_resume_on_two_ranks(two_ranks):
    results, _ = two_ranks
    for got in results:
        for name, loaded in got["loaded_lambda"].items():
            assert torch.equal(loaded.lambda_, got["factors"][name][2])
        assert got["resumed"] == (True, False, True)
    for name, lam in results[0]["sampled_lambda"].items():
        assert torch.equal(lam, results[1]["sampled_lambda"][name])


def test_a_bad_example_on_one_rank_makes_every_rank_raise(two_ranks):
    # the token ids of the whole training set are checked before it is sharded, so every rank refuses
    # the example in rank 1's shard itself, naming it (it used to surface on rank 1 as an IndexError
    # from the embedding lookup, and as a RankFailedError on rank 0)
    results, _ = two_ranks
    for got in results:
        kind, message = got["bad_shard"]
        assert kind == "ValueError"
        assert "training set item 6: 'input_ids' holds token id 500, outside the model's vocabulary of 97" in message


def _cuda_engine_outputs():
    """Factors and scores of the engine inputs with a float32 model on the GPU (the Triton kernels)."""
    import warnings

    from trustrepair import fit_ekfac, influence, pairwise_influence

    model, examples, trust, queries = _engine_inputs()
    model = model.to("cuda", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factors = fit_ekfac(model, examples, fisher="empirical", batch_size=3, progress=False)
        probes = {name: torch.randn(f.lambda_.shape, generator=torch.Generator().manual_seed(i)).cuda()
                  for i, (name, f) in enumerate(factors.modules.items())}
        return {
            "device": str(next(iter(factors.modules.values())).lambda_.device),
            "lambda": {name: f.lambda_.cpu() for name, f in factors.modules.items()},
            "preconditioned": {name: v.cpu() for name, v in factors.precondition(probes).items()},
            "aggregated": influence(model, factors, examples, trust, batch_size=3, progress=False),
            "pairwise": pairwise_influence(model, factors, examples, queries, batch_size=2, progress=False),
        }


@pytest.mark.gpu
def test_engine_on_two_ranks_sharing_a_gpu_equals_one_process():
    """gloo ranks with CUDA models: collectives stage through the CPU, kernels run on the GPU. (NCCL needs
    one GPU per rank, so it is not exercised on a one-GPU machine.)"""
    want = _cuda_engine_outputs()
    results = values(run_ranks(_cuda_engine_outputs, deadline_s=300, start_method="spawn"))
    for r, got in enumerate(results):
        assert got["device"].startswith("cuda")
        for name in want["lambda"]:  # float32 sums in another order: agreement to float32 rounding
            assert _relative_error(got["lambda"][name], want["lambda"][name]) <= 1e-4, (r, name)
            assert _relative_error(got["preconditioned"][name], want["preconditioned"][name]) <= 1e-4, (r, name)
        for aspect, scores in want["aggregated"].items():
            assert _relative_error(got["aggregated"][aspect], scores) <= 1e-4, (r, aspect)
        assert _relative_error(got["pairwise"], want["pairwise"]) <= 1e-4, r
    assert torch.equal(results[0]["pairwise"], results[1]["pairwise"])
    for name in want["lambda"]:
        assert torch.equal(results[0]["lambda"][name], results[1]["lambda"][name])
