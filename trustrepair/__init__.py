"""trustrepair: find the fine-tuning examples that made a language model less trustworthy, and repair it.

The public API is imported lazily so that ``import trustrepair`` stays cheap (no transformers import):

    factors = trustrepair.fit_ekfac(model, train)                          # EK-FAC factors
    scores  = trustrepair.influence(model, factors, train, trust={...})    # per-aspect, per-example
    matrix  = trustrepair.pairwise_influence(model, factors, train, queries)
    subset  = trustrepair.select_dpp(scores, embeddings, k=100, eta=1e4)
    result  = trustrepair.repair(model, factors, train, subset, beta=...)

The package has three layers, each importing only the ones below it:

* :mod:`trustrepair.engine` -- EK-FAC factors and their fit, the token capture, the contractions with
  their references and the routing to :mod:`trustrepair.kernels`, the parallel helpers;
* :mod:`trustrepair.methods` -- influence scores, subset selection, the repair step, trust metrics;
* :mod:`trustrepair.app` -- the command line and its run directory (settings, model loading, SFT,
  the prefix cache, the report). The library never imports it.

:mod:`trustrepair.task` (the model adapter) and :mod:`trustrepair.data` (dataset loaders) serve all three.

Sign convention everywhere: a positive influence score means that raising the loss on that training
example is predicted to improve (lower) the trust metric, i.e. the example is detrimental.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "select_dpp": "trustrepair.methods.selection",
    "fit_ekfac": "trustrepair.engine.ekfac",
    "EKFACFactors": "trustrepair.engine.ekfac",
    "PrefixStore": "trustrepair.engine.replay",
    "influence": "trustrepair.methods.scoring",
    "pairwise_influence": "trustrepair.methods.scoring",
    "self_influence": "trustrepair.methods.scoring",
    "normalized_influence": "trustrepair.methods.scoring",
    "CausalLMTask": "trustrepair.task",
    "repair": "trustrepair.methods.repair_step",
    "RepairDelta": "trustrepair.methods.repair_step",
    "evaluate": "trustrepair.methods.metrics",
    "run_demo": "trustrepair.app.pipeline",
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
