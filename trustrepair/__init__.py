"""trustrepair: find the fine-tuning examples that made a language model less trustworthy, and repair it.

The public API is imported lazily so that ``import trustrepair`` stays cheap (no transformers import):

    factors = trustrepair.fit_ekfac(model, train)                          # EK-FAC factors
    scores  = trustrepair.influence(model, factors, train, trust={...})    # per-aspect, per-example
    matrix  = trustrepair.pairwise_influence(model, factors, train, queries)
    subset  = trustrepair.select_dpp(scores, embeddings, k=100, eta=1e4)
    result  = trustrepair.repair(model, factors, train, subset, beta=...)

Sign convention everywhere: a positive influence score means that raising the loss on that training
example is predicted to improve (lower) the trust metric, i.e. the example is detrimental.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "select_dpp": "trustrepair.select",
    "fit_ekfac": "trustrepair.ekfac",
    "EKFACFactors": "trustrepair.ekfac",
    "influence": "trustrepair.influence",
    "pairwise_influence": "trustrepair.influence",
    "CausalLMTask": "trustrepair.task",
    "repair": "trustrepair.repair",
    "evaluate": "trustrepair.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trustrepair' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
