"""trustrepair: find the fine-tuning examples that made a language model less trustworthy, and repair it.

The public API is imported lazily so that ``import trustrepair`` stays cheap (no transformers import):

    factors = trustrepair.fit_ekfac(model, train)                          # EK-FAC factors
    scores  = trustrepair.influence(model, factors, train, trust={...})    # per-aspect, per-example
    matrix  = trustrepair.pairwise_influence(model, factors, train, queries)
    subset  = trustrepair.select_dpp(scores, embeddings, k=100, eta=1e4)
    result  = trustrepair.repair(model, factors, train, subset, beta=...)

``influence``, ``repair`` and ``evaluate`` are functions at the package level (the API above) and also
the names of the submodules that define them: import from those with ``from trustrepair.influence
import ...`` (``import trustrepair.influence as m`` returns the function).

Sign convention everywhere: a positive influence score means that raising the loss on that training
example is predicted to improve (lower) the trust metric, i.e. the example is detrimental.
"""
import sys
import types
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
    "RepairDelta": "trustrepair.repair",
    "evaluate": "trustrepair.evaluate",
    "run_demo": "trustrepair.pipeline",
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


class _PublicAPI(types.ModuleType):
    """The package module. ``influence``, ``repair`` and ``evaluate`` name both a submodule and the
    public function inside it; the import system binds a submodule to its package attribute when it is
    first imported, which would shadow the function. Those bindings are dropped (the submodules stay
    importable through ``sys.modules``: ``import trustrepair.influence``, ``from .influence import``)."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PublicAPI
