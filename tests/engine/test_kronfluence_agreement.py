"""Agreement with kronfluence 1.0.1 on the same tiny GPT-NeoX and data: empirical Fisher, the same
absolute damping, every accumulation in float64 on both sides.

kronfluence's sign is the opposite of trustrepair's (its negative = the training example raises the
measurement, i.e. detrimental), and its measurement here runs the model twice (opponent, then proponent)
with ``has_shared_parameters=True``, the flag it needs for such measurements. The adapter is the one the
benchmark uses (benchmarks/benchmark_ekfac.py).
"""
import pytest
import torch

from conftest import make_examples, make_queries, make_tiny_neox
from trustrepair import fit_ekfac, influence, pairwise_influence

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),  # kronfluence's torch.cuda.amp calls
              pytest.mark.usefixtures("one_thread")]
pytest.importorskip("kronfluence", reason="kronfluence 1.0.1 is not installed (bash scripts/setup.sh --test)")
from benchmarks.benchmark_ekfac import kronfluence_pairwise  # noqa: E402


@pytest.mark.parametrize("labelled_logits_only", [False, True], ids=["kronfluence-all-positions", "kronfluence-labelled"])
def test_pairwise_and_aggregated_scores_agree_with_kronfluence(tmp_path, labelled_logits_only):
    model = make_tiny_neox(seed=7)
    train = make_examples(20, seed=31)
    queries = make_queries(4, seed=32)
    damping = 0.01
    factors = fit_ekfac(model, train, fisher="empirical", progress=False)
    ours = pairwise_influence(model, factors, train, queries, damping=damping, progress=False)
    aggregated = influence(model, factors, train, {"all": queries}, damping=damping, progress=False)["all"]
    theirs, _ = kronfluence_pairwise(model, train, queries, modules=list(factors.modules), damping=damping,
                                     dtype=torch.float64, output_dir=tmp_path, labelled_logits_only=labelled_logits_only)
    theirs = -theirs.double()
    pearson = float(torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1])
    assert pearson >= 0.999, f"Pearson {pearson:.6f} against kronfluence"
    relative = float((ours - theirs).abs().max() / theirs.abs().max())
    assert relative <= 1e-6, f"float64 scores differ from kronfluence's by {relative:.2e} (relative to the largest)"
    assert float((aggregated - theirs.mean(0)).abs().max() / theirs.mean(0).abs().max()) <= 1e-6
