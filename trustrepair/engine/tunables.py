"""The performance settings of the engine, in one typed, validated, immutable place.

The library reads every setting through :func:`current` when it runs, so a setting changed by
:func:`override` takes effect on the next call:

    from trustrepair.engine.tunables import current, override

    with override(chunk_elements=1 << 20, pad_widths={"cuda": False}):
        fit_ekfac(model, train)          # runs with the overridden settings
    current().chunk_elements             # back to the default

None of them changes a result beyond the rounding of a different summation order or product algorithm
(most change none at all): they trade speed against memory and pick between equivalent algorithms. The
measurements behind every default are in benchmarks/RESULTS.md, in its "Decisions" table.

The settings are process-wide (a plain module variable, not a context variable), so the worker threads
of :mod:`trustrepair.engine.streams` see what their caller set; :func:`override` is meant for a script's
main thread (benchmarks, tests), not for concurrent use from several threads.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Mapping


def _per_device(values: dict) -> Mapping:
    return field(default_factory=lambda: MappingProxyType(dict(values)))


@dataclass(frozen=True)
class Tunables:
    """Every performance setting of the engine (see the module docstring); validated on construction."""

    chunk_elements: int = 1 << 24
    """Largest intermediate, in elements, that one chunk of examples of a gradient contraction may allocate
    (:mod:`trustrepair.engine.ops`): 64 MiB in float32. Large enough that every product of a chunk is
    efficient, small enough to bound memory (benchmarks/RESULTS.md, decisions)."""

    slab_elements: int = 1 << 17
    """Elements of one example's slab of projected-gradient rows that the eigenvalue correction's CPU path
    squares into its sum right after computing it: 512 KiB in float32, about one core's L2 cache
    (benchmarks/RESULTS.md, decisions)."""

    tile_elements: int = 1 << 20
    """Elements of the slab of per-example gradients (B, rows, d_in) that the gradient-first ghost dot
    products form at a time on a CPU: 4 MiB in float32, cache-sized for the product that consumes it
    (benchmarks/RESULTS.md, decisions)."""

    memory_cost_per_entry: int = 128
    """Multiply-adds that writing one entry of a per-example (d_out, d_in) matrix to memory and reading it
    back are worth in the contractions' cost model; 128 makes forming G_b pay off from 3 matrices on
    (benchmarks/RESULTS.md, decisions)."""

    gram_block: Mapping[str, int | None] = _per_device({"cpu": 1024, "cuda": 1024})
    """Per device type: block width, in columns, of the covariance update
    :func:`trustrepair.engine.ops.gram.add_gram_upper_` (None: one block, the full product); device types
    not named use the "cpu" entry. 1024 on a CPU keeps every block product wide enough for the BLAS rate
    (narrower blocks ran slower than the full product there); 1024 makes fewer, larger launches on
    a GPU (benchmarks/RESULTS.md, decisions)."""

    pad_widths: Mapping[str, bool] = _per_device({"cpu": False, "cuda": True})
    """Per device type (types not named: False): whether the fit's Gram and projection products and the
    scoring pass's per-example slabs run on operands zero-padded to an aligned width
    (:func:`trustrepair.engine.layout.zero_padded`). On for CUDA, where cuBLAS runs odd widths slower; off
    for a CPU, where the copy is pure cost (benchmarks/RESULTS.md, decisions)."""

    triton_ops: frozenset[str] = frozenset({"projected_gradient_squares"})
    """Operations whose CUDA tensors run their Triton kernel (:mod:`trustrepair.engine.ops.routing` has the
    whole rule and the names that have one); an empty set runs cuBLAS everywhere. The eigenvalue
    correction's kernel beats its cuBLAS reference (benchmarks/RESULTS.md, decisions)."""

    eigh_streams: int = 4
    """float64 eigendecompositions in flight at once on a CUDA device, each on its own stream and host thread
    (:func:`trustrepair.engine.streams.map_on_streams`; fewer when free memory is short, one on a CPU).
    Results do not depend on it; 4 was the faster schedule measured (benchmarks/RESULTS.md, decisions)."""

    eigh_host_below: int = 0
    """With factors on a CUDA device, those narrower than this many rows are eigendecomposed by the host's
    LAPACK (float64 too) while the device takes the wider ones; 0 keeps every factor on the device, which
    was faster (benchmarks/RESULTS.md, decisions)."""

    lowrank_oversample: int = 10
    """Extra columns p of the randomized range finder of :func:`trustrepair.engine.lowrank.low_rank_factors`
    (sketch width r + p); Halko, Martinsson & Tropp's recommended 5-10 (benchmarks/RESULTS.md, decisions)."""

    lowrank_power_iterations: int = 2
    """Power iterations q of that range finder; 2 brings slowly decaying spectra near the optimal
    approximation at (2 + 2 q) passes over the matrix (benchmarks/RESULTS.md, decisions)."""

    def __post_init__(self):
        for name in ("chunk_elements", "slab_elements", "tile_elements", "eigh_streams"):
            _require_int(name, getattr(self, name), minimum=1)
        for name in ("memory_cost_per_entry", "eigh_host_below", "lowrank_oversample", "lowrank_power_iterations"):
            _require_int(name, getattr(self, name), minimum=0)
        gram_block = _device_mapping("gram_block", self.gram_block)
        for device, block in gram_block.items():
            if block is not None:
                _require_int(f"gram_block[{device!r}]", block, minimum=1)
        if "cpu" not in gram_block:
            raise ValueError("gram_block needs a 'cpu' entry (the block of device types it does not name)")
        pad_widths = _device_mapping("pad_widths", self.pad_widths)
        for device, pad in pad_widths.items():
            if not isinstance(pad, bool):
                raise ValueError(f"pad_widths[{device!r}] must be True or False; got {pad!r}")
        try:
            triton_ops = frozenset(self.triton_ops)
        except TypeError:
            triton_ops = None
        if isinstance(self.triton_ops, str) or triton_ops is None or not all(isinstance(op, str) for op in triton_ops):
            raise ValueError(f"triton_ops must be a set of operation names; got {self.triton_ops!r}")
        from trustrepair.engine.ops.routing import KERNELS  # the routing module imports this one at its top

        unknown = sorted(triton_ops - set(KERNELS))
        if unknown:
            raise ValueError(f"triton_ops names operations without a Triton kernel: {unknown}; the operations "
                             f"with one are {sorted(KERNELS)}")
        object.__setattr__(self, "gram_block", MappingProxyType(gram_block))
        object.__setattr__(self, "pad_widths", MappingProxyType(pad_widths))
        object.__setattr__(self, "triton_ops", triton_ops)


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _device_mapping(name: str, value) -> dict:
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ValueError(f"{name} must map device types ('cpu', 'cuda', ...) to values; got {value!r}")
    return dict(value)


FIELDS = tuple(f.name for f in dataclasses.fields(Tunables))
"""The names :func:`override` accepts."""

_PER_DEVICE = ("gram_block", "pad_widths")

def current() -> Tunables:
    """The settings the library reads now: the defaults, or those of the innermost :func:`override`."""
    return _current


@contextlib.contextmanager
def override(**changes) -> Iterator[Tunables]:
    """Run the block with some settings changed; yields the new :class:`Tunables`.

    Per-device mappings are merged into the current ones (``override(pad_widths={"cuda": False})`` changes
    only the "cuda" entry). The previous settings come back when the block exits, also when it raises.

    Raises:
        TypeError: a name that is not a setting (before anything changes), naming the valid ones.
        ValueError: a value the setting cannot take.
    """
    global _current
    unknown = sorted(set(changes) - set(FIELDS))
    if unknown:
        raise TypeError(f"override() got unknown setting(s) {unknown}; the settings are {list(FIELDS)}")
    previous = _current
    for name in _PER_DEVICE:
        if name in changes:
            if not isinstance(changes[name], Mapping):
                raise ValueError(f"{name} must map device types to values; got {changes[name]!r}")
            changes[name] = {**getattr(previous, name), **changes[name]}
    updated = dataclasses.replace(previous, **changes)
    _current = updated
    try:
        yield updated
    finally:
        _current = previous


_current = Tunables()  # last: validating the defaults imports the routing module, which imports current
