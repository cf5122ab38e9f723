"""EK-FAC factors of a model on a training set: fitting, preconditioning, saving and loading.

For every tracked layer with folded weight W (d_out, d_in [+ 1]) (see :mod:`trustrepair.engine.layers`),
EK-FAC approximates the Fisher G = E_z[vec(G_z) vec(G_z)^T] of the per-example gradients
G_z = sum_t g_t a_t^T in three stages:

1. **covariances** (one forward + backward pass): A = sum_t a_t a_t^T / N and S = sum_t g_t g_t^T / N
   over every non-padding token t of every example (prompt tokens included: they carry gradient
   through later tokens' losses), N the number of those tokens; a has the bias ones column; on a GPU
   the Gram products run on zero-padded even widths (the ``pad_widths`` setting,
   :mod:`trustrepair.engine.tunables`) and are read back at the true width;
2. **eigendecomposition**: A = Q_A diag(.) Q_A^T and S = Q_S diag(.) Q_S^T, computed by ``eigh`` in
   float64 on the symmetrised (A + A^T) / 2, several at once (on a GPU the ``eigh_streams`` setting, the
   narrow ones optionally on the host, ``eigh_host_below``; on a CPU one single-threaded ``eigh`` per
   intra-op thread);
3. **eigenvalue correction** (a second pass, which needs the eigenbases):
   Lambda = (1 / n) sum_z (Q_S^T G_z Q_A) ** 2 (elementwise) over **all** n examples; an example
   with no labelled token has G_z = 0, contributes zero and is counted.

The damped inverse-Fisher-vector product of a (d_out, d_in [+ 1]) matrix V is then

    (G + lambda I)^{-1} V = Q_S [ (Q_S^T V Q_A) / (Lambda + lambda) ] Q_A^T,

with lambda = 0.1 * mean(Lambda) per layer by default (Grosse et al. 2023; kronfluence's heuristic)
or an absolute float. ``fisher="sampled"`` draws the targets of the training loss from the model's own
predictive distribution (the true Fisher, kronfluence's default); ``"empirical"`` uses the data's labels.
These conventions are kronfluence's, so scores are comparable with it.

Precision: covariances and Lambda accumulate in float32 (float64 for a float64 model): covariance
sums are sums of many positive-semidefinite terms and Lambda of non-negative squares, so float32 loses
no meaningful accuracy at fine-tuning-set sizes and halves memory against float64; the
eigendecomposition runs in float64 because the small eigenvalues of A and S (and hence the
orthogonality of the bases) are sensitive to rounding; the stored factors are float32 (float64 for a
float64 model).

Under ``torch.distributed`` (see :mod:`trustrepair.engine.distributed`) every rank runs both passes on its
contiguous shard of the examples; the covariance and Lambda sums are all-reduced (in float64) and the
token counts summed exactly, each eigendecomposition runs on one rank and is broadcast, so every rank
ends with the same factors, equal to a single-process fit's up to summation order (with
``fisher="empirical"``; sampled targets come from a per-rank random stream). Only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from trustrepair.engine import storage
from trustrepair.engine.layout import aligned, padded_width, pads_widths, zero_padded
from trustrepair.batching import padded_batches
from trustrepair.engine.capture import TokenCapture
from trustrepair.engine.arguments import finite
from trustrepair.engine.examples import as_examples, describe_rows, unlabelled
from trustrepair.engine.ops.gram import add_gram_upper_, symmetric_from_upper
from trustrepair.engine.ops.projected_gradients import projected_gradient_squares
from trustrepair.engine.distributed import (all_reduce_counts, all_reduce_sum_, fail_together, is_main_process, map_once,
                                     progress_enabled, rank, require_agreement, shard_range, world_size)
from trustrepair.engine.replay import PrefixStore, prefix_pass
from trustrepair.engine.layers import ModuleSelection, TrackedLayer, find_modules, model_fingerprint, tensor_versions
from trustrepair.engine.tunables import current
from trustrepair.task import CausalLMTask, Example, Task

FORMAT = "trustrepair.ekfac/1"  # the on-disk format name, kept across the move to engine/ so saved factors load
DAMPING_SCALE = 0.1
FISHER_KINDS = ("sampled", "empirical")

@dataclass
class ModuleFactors:
    """EK-FAC factors of one layer.

    The eigenbases are stored with aligned rows (:mod:`trustrepair.engine.layout`; a copy on construction when
    they are not): the odd width of a bias-folded Q_A would otherwise misalign every product with it, in
    query projections and preconditioning, whether the factors were fitted, moved or loaded.

    Attributes:
        q_a: (d_in [+ 1], d_in [+ 1]) eigenvectors (columns) of the activation covariance A.
        q_s: (d_out, d_out) eigenvectors of the output-gradient covariance S.
        lambda_: (d_out, d_in [+ 1]) eigenvalue correction, the mean over examples of the squared
            projected per-example gradient.
        n_tokens: tokens the covariances averaged over.
        n_examples: examples Lambda averaged over.
    """

    q_a: torch.Tensor
    q_s: torch.Tensor
    lambda_: torch.Tensor
    n_tokens: int
    n_examples: int

    def __post_init__(self):
        self.q_a, self.q_s = aligned(self.q_a), aligned(self.q_s)


class EKFACFactors:
    """Fitted EK-FAC factors of a model: per-module :class:`ModuleFactors` plus provenance.

    Attributes:
        modules: module name -> :class:`ModuleFactors`, in forward order.
        arguments: the fitting arguments (fisher, seed, batch size, example count, ...).
        fingerprint: the model's analysed layers and weight digest (see
            :func:`trustrepair.engine.layers.model_fingerprint`).
        timings: seconds per stage: ``covariance``, ``eigendecomposition``, ``lambda`` (``covariance`` is
            absent when it was resumed from a checkpoint).
        versions: library versions that produced the factors.
    """

    def __init__(self, modules: dict[str, ModuleFactors], arguments: dict, fingerprint: dict,
                 timings: dict | None = None, versions: dict | None = None, damping_scale: float = DAMPING_SCALE):
        self.modules = modules
        self.arguments = arguments
        self.fingerprint = fingerprint
        self.timings = dict(timings or {})
        self.versions = dict(versions or _versions())
        self.damping_scale = finite("damping_scale", damping_scale, positive=True,
                                    hint="the default damping as a multiple of mean(Lambda)")
        self._verified: tuple | None = None  # (weak reference to a model, its tensor versions) that passed

    def __repr__(self) -> str:
        return (f"EKFACFactors({len(self.modules)} modules, fisher={self.arguments.get('fisher')!r}, "
                f"{self.arguments.get('n_examples')} examples)")

    def to(self, device) -> "EKFACFactors":
        """The factors on ``device`` (a new object; tensors already there are not copied)."""
        moved = {name: ModuleFactors(f.q_a.to(device), f.q_s.to(device), f.lambda_.to(device), f.n_tokens,
                                     f.n_examples) for name, f in self.modules.items()}
        return EKFACFactors(moved, self.arguments, self.fingerprint, self.timings, self.versions, self.damping_scale)

    def with_damping_scale(self, scale: float) -> "EKFACFactors":
        """The same factors (tensors shared, not copied) whose default damping (``damping=None``) is
        ``scale`` x mean(Lambda) per module instead of ``damping_scale``; not saved with the factors."""
        return EKFACFactors(self.modules, self.arguments, self.fingerprint, self.timings, self.versions, scale)

    def damping(self, name: str, damping: float | None = None) -> float:
        """The damping lambda of module ``name``: ``None`` -> ``damping_scale`` (0.1 unless set by
        :meth:`with_damping_scale`) x mean(Lambda), a float -> itself.

        Raises:
            ValueError: a negative or non-finite damping, or a zero damping where Lambda has zeros
                (the inverse would divide by zero).
        """
        lam = self._factors(name).lambda_
        if damping is None:
            value = self.damping_scale * float(lam.mean())
            if value <= 0:
                raise ValueError(f"Lambda of module {name!r} is all zero (no training example had a labelled "
                                 f"token?), so the default damping {self.damping_scale:g} * mean(Lambda) is 0; "
                                 "pass damping > 0")
            return value
        value = check_damping(damping)
        if value == 0 and float(lam.min()) <= 0:
            raise ValueError(f"damping=0 with Lambda of module {name!r} having zero entries would divide by "
                             f"zero; pass damping > 0")
        return value

    def precondition_projected(self, projected: Mapping[str, torch.Tensor],
                               damping: float | None = None) -> dict[str, torch.Tensor]:
        """Like :meth:`precondition` for gradients already in the eigenbasis, P = Q_S^T V Q_A (e.g. from
        :func:`trustrepair.engine.ops.projected_gradients.projected_gradients`): returns Q_S [P / (Lambda + lambda)] Q_A^T,
        in the original basis (computed in the factors' dtype even inside an autocast region)."""
        out = {}
        for name, scaled in self.divide_projected(projected, damping).items():
            f = self._factors(name)
            with torch.autocast(f.q_a.device.type, enabled=False):
                out[name] = f.q_s @ scaled @ f.q_a.T
        return out

    def divide_projected(self, projected: Mapping[str, torch.Tensor], damping: float | None = None, *,
                         in_place: bool = False) -> dict[str, torch.Tensor]:
        """P / (Lambda + lambda) for gradients already in the eigenbasis: the damped inverse Fisher in
        eigenbasis coordinates, before the rotation back (e.g. to factorise it, :mod:`trustrepair.engine.lowrank`).
        In the factors' dtype and on their device; ``in_place`` divides each P itself when it already is
        (no second buffer of its size)."""
        out = {}
        for name, p in projected.items():
            f = self._factors(name)
            self._check_shape(name, p)
            p = p.to(device=f.q_a.device, dtype=f.q_a.dtype)
            denominator = f.lambda_ + self.damping(name, damping)
            out[name] = p.div_(denominator) if in_place else p / denominator
        return out

    def precondition(self, grads: Mapping[str, torch.Tensor],
                     damping: float | None = None) -> dict[str, torch.Tensor]:
        """Damped inverse-Fisher-vector products, module by module.

        out[name] = Q_S [ (Q_S^T V Q_A) / (Lambda + lambda) ] Q_A^T for V = grads[name].

        Args:
            grads: module name -> (..., d_out, d_in [+ 1]) matrices in the folded layout (leading
                dimensions are batched over, e.g. one matrix per query).
            damping: ``None`` for 0.1 * mean(Lambda) per module, or an absolute float.
        Returns:
            module name -> tensor of the same shape, in the factors' dtype and on their device.
        """
        return self.precondition_projected(self.project(grads), damping)

    def project(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Q_S^T V Q_A: matrices in the folded layout rotated into each module's eigenbasis (leading
        dimensions batched over), in the factors' dtype even inside an autocast region."""
        projected = {}
        for name, v in grads.items():
            f = self._factors(name)
            self._check_shape(name, v)
            v = v.to(device=f.q_a.device, dtype=f.q_a.dtype)
            with torch.autocast(f.q_a.device.type, enabled=False):
                projected[name] = f.q_s.T @ v @ f.q_a
        return projected

    def _check_shape(self, name: str, v: torch.Tensor) -> None:
        shape = tuple(self._factors(name).lambda_.shape)
        if v.dim() < 2 or tuple(v.shape[-2:]) != shape:
            raise ValueError(f"gradient for {name!r} must be (..., {shape[0]}, {shape[1]}) = (..., d_out, d_in [+ 1]); "
                             f"got {tuple(v.shape)}")

    def check_model(self, model: nn.Module, weights: bool = True) -> None:
        """Raise ``ValueError`` unless ``model`` has the analysed layers with the same shapes (and, with
        ``weights=True``, the same weight digest) as the model the factors were fitted on.

        A model whose weights passed the digest check is remembered with the in-place version counters of
        its parameters and buffers: until one of them is modified (an optimiser step, ``RepairDelta.apply``
        or ``revert``), checking it again costs no hashing."""
        state = tensor_versions(model) if weights else None
        if weights and self._verified is not None and self._verified[0]() is model and self._verified[1] == state:
            return
        names = list(self.fingerprint["modules"])
        try:
            layers = find_modules(model, names)
        except ValueError as err:
            raise ValueError(f"these EK-FAC factors do not belong to this model: {err}. Fit new factors with "
                             f"fit_ekfac(model, train)") from err
        found = model_fingerprint(model, layers) if weights else {
            "modules": {l.name: [l.d_out, l.d_in, l.has_bias] for l in layers}}
        expected = {k: v for k, v in self.fingerprint.items() if weights or k == "modules"}
        if found != expected:
            differ = [n for n in names if found["modules"][n] != expected["modules"][n]]
            what = (f"layer shapes differ at {differ[:5]} ([d_out, d_in, has_bias] fitted "
                    f"{[expected['modules'][n] for n in differ[:5]]}, model {[found['modules'][n] for n in differ[:5]]})"
                    if differ else "the weights differ (digest mismatch)")
            skip = "" if differ else (", or pass check_fingerprint=False if the model is meant to differ from the "
                                      "one they were fitted on (e.g. the factors of a parent checkpoint)")
            raise ValueError(f"these EK-FAC factors were fitted on a different model: {what}. Fit new factors "
                             f"with fit_ekfac(model, train){skip}")
        if weights:
            self._verified = (weakref.ref(model), state)

    # -- persistence -----------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``factors.safetensors`` and ``factors.json`` (arguments, fingerprint, versions, timings)
        into ``directory``, each atomically (temporary file + ``os.replace``); the JSON is written last
        and both carry the same save id, so a reader never mixes two saves. Returns the directory.

        Under ``torch.distributed`` only rank 0 writes; every rank returns once the files are complete,
        and a failed write raises on every rank."""
        directory = Path(directory)
        with fail_together(f"saving EK-FAC factors to {directory}"):
            if is_main_process():
                self._write(directory)
        return directory

    def _write(self, directory: Path) -> None:
        tensors = {}
        for name, f in self.modules.items():
            tensors[f"{name}/q_a"] = f.q_a
            tensors[f"{name}/q_s"] = f.q_s
            tensors[f"{name}/lambda"] = f.lambda_
        storage.save_paired(directory, "factors", tensors, {
            "format": FORMAT, "arguments": self.arguments, "fingerprint": self.fingerprint,
            "versions": self.versions, "timings": self.timings,
            "counts": {name: {"n_tokens": f.n_tokens, "n_examples": f.n_examples} for name, f in self.modules.items()},
        })

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module | None = None) -> "EKFACFactors":
        """Read factors written by :meth:`save` (on the CPU). With ``model``, refuse (``ValueError``)
        unless it is the model they were fitted on (same layers, shapes and weights)."""
        directory = Path(directory)
        meta = storage.load_paired_metadata(directory, "factors")
        if meta is None:
            raise FileNotFoundError(f"no saved EK-FAC factors in {directory} (expected factors.json and "
                                    f"factors.safetensors written by EKFACFactors.save)")
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory / 'factors.json'} has format {meta.get('format')!r}; this trustrepair "
                             f"reads {FORMAT!r}")
        tensors = storage.load_paired_tensors(directory, "factors", meta)
        if tensors is None:
            raise ValueError(f"{directory / 'factors.safetensors'} and {directory / 'factors.json'} come from "
                             f"different saves (an interrupted save?); save the factors again")
        modules = {
            name: ModuleFactors(tensors[f"{name}/q_a"], tensors[f"{name}/q_s"], tensors[f"{name}/lambda"],
                                counts["n_tokens"], counts["n_examples"])
            for name, counts in meta["counts"].items()
        }
        factors = cls(modules, meta["arguments"], meta["fingerprint"], meta["timings"], meta["versions"])
        if model is not None:
            factors.check_model(model)
        return factors

    def _factors(self, name: str) -> ModuleFactors:
        if name not in self.modules:
            raise ValueError(f"no EK-FAC factors for module {name!r}; fitted modules: {list(self.modules)[:8]}"
                             f"{' ...' if len(self.modules) > 8 else ''}")
        return self.modules[name]


def check_damping(damping: float | None) -> float | None:
    """``damping`` as given where it enters a public function: ``None`` (0.1 * mean(Lambda) per module) or
    a finite absolute value >= 0."""
    if damping is None:
        return None
    return finite("damping", damping, minimum=0, hint="absolute; or None for 0.1 * mean(Lambda) per module")


# ----------------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------------

def fit_ekfac(model: nn.Module, train, *, modules: ModuleSelection = None, task: Task | None = None,
              fisher: str = "sampled", batch_size: int = 8, max_examples: int | None = None,
              progress: bool = True, seed: int = 0, checkpoint_dir: str | os.PathLike | None = None,
              matmul_dtype: torch.dtype | None = None, replay_prefix: bool = True,
              prefix_store: PrefixStore | None = None) -> EKFACFactors:
    """Fit EK-FAC factors of ``model`` on a training set (see the module docstring for the math).

    Args:
        model: any ``nn.Module`` the task can run (a Hugging Face causal LM with the default task).
        train: sequence or map-style dataset of examples (dicts of 1-D ``input_ids``, ``labels``).
        modules: which layers; ``None`` = every Linear / Conv1D in the transformer blocks, else names or
            a predicate (see :func:`trustrepair.engine.layers.find_modules`).
        task: computes the per-example training loss; defaults to :class:`CausalLMTask`.
        fisher: ``"sampled"`` (targets drawn from the model: true Fisher) or ``"empirical"`` (data labels).
        batch_size: examples per forward/backward pass; memory is about one batch of activations plus
            the factors (two d x d covariances and one d_out x d_in matrix per layer).
        max_examples: fit on the first ``max_examples`` examples only.
        progress: show a tqdm bar per pass (on rank 0 only under ``torch.distributed``).
        seed: seeds the sampled targets (each pass has its own stream, so a resumed fit equals an
            uninterrupted one; under ``torch.distributed`` each rank has its own streams).
        checkpoint_dir: if given, the covariance stage is saved there atomically, and a later call with
            the same model, data and arguments resumes from it instead of recomputing it.
        matmul_dtype: if given (e.g. ``torch.bfloat16``), activations and gradients are cast to it before
            the eigenvalue-correction contraction: on CUDA the Triton kernel then runs bf16 products with
            float32 accumulation; the CPU path upcasts to float32 again (no bf16 speed-up without bf16
            hardware, only the rounding).
        replay_prefix: when the analysed layers start at block b > 0 of the model's block list, run
            blocks 0 .. b - 1 in the covariance pass only and replay their recorded output in the
            eigenvalue-correction pass (:mod:`trustrepair.engine.replay`: the same factors, one prefix
            forward fewer); the second pass runs the whole model when the forward does not meet that
            module's conditions or the recordings would take over a quarter of the free memory.
        prefix_store: a :class:`trustrepair.engine.replay.PrefixStore` to record into and replay from
            instead of a private one, kept after the fit: pass it on to :func:`trustrepair.influence` or
            :func:`trustrepair.pairwise_influence` (same training set and ``batch_size``) so that their
            training-set pass skips the prefix too. Needs ``replay_prefix``.
    Returns:
        :class:`EKFACFactors` with per-stage ``timings``.

    Distributed: with an initialised process group this is a collective call (every rank calls it with
    the same model, data and arguments); see the module docstring. ``checkpoint_dir`` must then be on a
    filesystem every rank sees.
    Raises:
        ValueError: empty data, unknown modules, bad arguments, or a checkpoint made with other inputs.
        FloatingPointError: a non-finite loss or gradient (naming the batch and module).
    """
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher must be one of {FISHER_KINDS}; got {fisher!r}")
    if prefix_store is not None and not replay_prefix:
        raise ValueError("prefix_store is used only with replay_prefix=True; drop one of the two")
    task = task or CausalLMTask()
    progress = progress_enabled(progress)
    layers = find_modules(model, modules)
    examples = as_examples(train, "training set", max_examples, task.vocab_size(model))
    empty = unlabelled(examples)
    if len(empty) == len(examples):
        raise ValueError(f"no training example has a labelled token (all {len(examples)} have labels[1:] == -100): "
                         f"the Fisher would be zero; label the responses (labels = input_ids outside the prompt)")
    if empty:
        warnings.warn(f"{len(empty)} of {len(examples)} training examples have no labelled token (indices "
                      f"{empty[:10]}{' ...' if len(empty) > 10 else ''}): their gradient is zero; they count in "
                      f"Lambda's mean and will score 0", stacklevel=2)
    arguments = {
        "fisher": fisher, "batch_size": batch_size, "max_examples": max_examples, "seed": seed,
        "n_examples": len(examples), "modules": [layer.name for layer in layers],
        "matmul_dtype": None if matmul_dtype is None else str(matmul_dtype).replace("torch.", ""),
        "data_digest": data_digest(examples), "world_size": world_size(),
    }
    # The weight digest (about a second of CPU hashing for 160M parameters) is computed on a thread while
    # the passes run: hashlib releases the GIL, and on a GPU the CPU is otherwise idle.
    store = (PrefixStore() if prefix_store is None else prefix_store) if replay_prefix else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trustrepair-fingerprint") as pool:
        versions = tensor_versions(model)
        fingerprint_job = pool.submit(model_fingerprint, model, layers)
        modules, timings = _fit_stages(model, layers, examples, task, fisher, batch_size, seed, progress,
                                       checkpoint_dir, matmul_dtype, arguments, fingerprint_job.result, store)
        factors = EKFACFactors(modules, arguments, fingerprint_job.result(), timings)
    factors._verified = (weakref.ref(model), versions)  # the digest is of these very tensors
    return factors


def _fit_stages(model, layers, examples, task, fisher, batch_size, seed, progress, checkpoint_dir, matmul_dtype,
                arguments, fingerprint: Callable[[], dict],
                replay: PrefixStore | None) -> tuple[dict[str, ModuleFactors], dict[str, float]]:
    """The three stages of :func:`fit_ekfac`: (factors per layer name, seconds per stage).
    ``fingerprint()`` waits for the model's digest, which only the covariance checkpoint needs early;
    ``replay`` (a prefix store) records the prefix in the covariance pass and replays it in the Lambda pass."""
    dtype = factor_dtype(layers)
    timings: dict[str, float] = {}

    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    device = layers[0].module.weight.device
    covariances = None
    if checkpoint is not None:
        with fail_together(f"loading the covariance checkpoint in {checkpoint}"):
            covariances = _load_covariances(checkpoint, arguments, fingerprint(), device)
        require_agreement(covariances is not None, f"only some ranks found the covariance checkpoint in "
                          f"{checkpoint}; put checkpoint_dir on a filesystem that every rank shares")
    if covariances is None:
        start = time.perf_counter()
        covariances = _covariance_pass(model, layers, examples, task, fisher, batch_size, seed, dtype, progress,
                                       replay)
        timings["covariance"] = time.perf_counter() - start
        if checkpoint is not None:
            with fail_together(f"saving the covariance checkpoint in {checkpoint}"):
                if is_main_process():
                    _save_covariances(checkpoint, covariances, arguments, fingerprint())

    start = time.perf_counter()
    sums = [(covariances[layer.name][side], covariances[layer.name][2]) for layer in layers for side in (0, 1)]
    workers = _eigh_workers([s for s, _ in sums])
    with _one_thread_each(device):
        vectors = map_once(lambda item: _eigenbasis(item[0], item[1], dtype), sums,
                           lambda item: torch.empty(item[0].shape, dtype=dtype, device=item[0].device),
                           cost=lambda item: item[0].shape[0] ** 3, desc="EK-FAC eigendecomposition",
                           progress=progress, workers=workers)
    # aligned once here, for the Lambda pass's products and then the returned factors
    bases = {layer.name: (aligned(vectors[2 * i]), aligned(vectors[2 * i + 1])) for i, layer in enumerate(layers)}
    timings["eigendecomposition"] = time.perf_counter() - start

    start = time.perf_counter()
    lambdas = _lambda_pass(model, layers, examples, task, fisher, batch_size, seed, bases, dtype, matmul_dtype,
                           progress, replay)
    timings["lambda"] = time.perf_counter() - start

    factors = {
        layer.name: ModuleFactors(bases[layer.name][0], bases[layer.name][1], lambdas[layer.name] / len(examples),
                                  covariances[layer.name][2], len(examples))
        for layer in layers
    }
    return factors, timings


def _training_objective(model: nn.Module, task: Task, batch, fisher: str,
                        generator: torch.Generator | None) -> Callable[[], torch.Tensor]:
    if fisher == "sampled":
        return lambda: task.train_loss(model, batch, sample=True, generator=generator)
    return lambda: task.train_loss(model, batch)


def _generator(layers: list[TrackedLayer], seed: int, stream: int) -> torch.Generator:
    """Independent, reproducible random stream per pass (stream 0: covariances, 1: Lambda) and rank
    (seed (2 seed + stream) W + rank for W ranks; 2 seed + stream in a single process)."""
    device = layers[0].module.weight.device
    return torch.Generator(device=device).manual_seed((seed * 2 + stream) * world_size() + rank())


def _covariance_pass(model, layers, examples, task, fisher, batch_size, seed, dtype, progress,
                     replay: PrefixStore | None = None) -> dict:
    """Sums sum_t a_t a_t^T, sum_t g_t g_t^T and token counts per layer (padding rows are zero), over
    this rank's shard of the examples, then summed over ranks; ``replay`` (a prefix store) records or
    replays the prefix per batch."""
    device = layers[0].module.weight.device
    pad = pads_widths(device)  # Grams of zero-padded token rows: the padding rows and columns stay zero
    operand, width = (zero_padded, padded_width) if pad else (aligned, lambda n: n)
    a_sums = [torch.zeros(width(l.folded_in), width(l.folded_in), dtype=dtype, device=device) for l in layers]
    s_sums = [torch.zeros(width(l.d_out), width(l.d_out), dtype=dtype, device=device) for l in layers]
    counts = [0] * len(layers)
    generator = _generator(layers, seed, 0)
    shard = shard_range(len(examples))
    with fail_together("the EK-FAC covariance pass"), TokenCapture(model, layers) as capture, \
            prefix_pass(replay, model, layers) as prefix:
        for number, (rows, batch) in enumerate(padded_batches(examples[shard.start:shard.stop], batch_size,
                                                               "EK-FAC covariances", progress, task.collate)):
            rows = [shard.start + row for row in rows]
            mask = task.token_mask(batch)
            n_valid, tokens = int(mask.sum()), mask.shape[1]

            def on_layer(i, a, g):
                a = operand(a.reshape(-1, a.shape[-1]), dtype)
                g = operand(g.reshape(-1, g.shape[-1]), dtype)
                add_gram_upper_(a_sums[i], a)
                add_gram_upper_(s_sums[i], g)
                counts[i] += n_valid * (a.shape[0] // (mask.shape[0] * tokens))

            with prefix.batch(batch):
                capture.run(_training_objective(model, task, batch, fisher, generator), mask,
                            describe_rows("training set", number, rows), on_layer)
    all_reduce_sum_(a_sums + s_sums)
    counts = all_reduce_counts(counts)
    return {l.name: (symmetric_from_upper(a_sums[i][:l.folded_in, :l.folded_in]),
                     symmetric_from_upper(s_sums[i][:l.d_out, :l.d_out]), counts[i])
            for i, l in enumerate(layers)}


@contextlib.contextmanager
def _one_thread_each(device: torch.device):
    """On a CPU, torch's (and MKL's) intra-op threads set to 1 for the block, restored after it: MKL's
    threaded float64 ``syevd`` gains little from a second core and loses badly when the cores are
    shared (benchmarks/RESULTS.md, issue 18: a 1536-wide eigh took 4.4-5.2 CPU s with 2 threads against
    0.9 with one on a loaded 2-core machine), so the eigendecompositions run one thread each, several at
    once (:func:`_eigh_workers`). A no-op on other devices."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _eigh_workers(covariances: list[torch.Tensor]) -> int:
    """The ``eigh_streams`` setting on a CUDA device, as far as half its free memory holds that many of the widest
    decompositions (about 6 n^2 float64 values each: the float64 copy, its symmetrised form, the
    eigenvectors and cuSOLVER's workspace); on a CPU, as many as torch has intra-op threads (each
    decomposition then runs on one thread, :func:`_one_thread_each`)."""
    device = covariances[0].device
    if device.type != "cuda":
        return max(1, min(len(covariances), torch.get_num_threads()))
    free, _ = torch.cuda.mem_get_info(device)
    widest = max(c.shape[0] for c in covariances)
    return int(max(1, min(current().eigh_streams, free // (2 * 6 * 8 * widest * widest))))


def _eigenbasis(cov_sum: torch.Tensor, n_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Eigenvectors (columns) of the symmetrised mean covariance, by eigh in float64 (:func:`eigh_float64`)."""
    cov = cov_sum.to(torch.float64) / max(n_tokens, 1)
    _, vectors = eigh_float64((cov + cov.T) / 2)
    return vectors.to(dtype).contiguous()


def eigh_float64(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a float64 symmetric matrix, on the host when it lives on a CUDA device and is
    narrower than the ``eigh_host_below`` setting (results returned to its device), on its own device
    otherwise. The host's and the device's solvers agree to rounding on the eigenvalues; eigenvectors of
    (near-)repeated eigenvalues may differ by a rotation within their eigenspace, which EK-FAC's eigenvalue
    correction absorbs."""
    if matrix.is_cuda and matrix.shape[-1] < current().eigh_host_below:
        values, vectors = torch.linalg.eigh(matrix.cpu())
        return values.to(matrix.device), vectors.to(matrix.device)
    return torch.linalg.eigh(matrix)


def _lambda_pass(model, layers, examples, task, fisher, batch_size, seed, bases, dtype, matmul_dtype,
                 progress, replay: PrefixStore | None = None) -> dict:
    """Sum over examples of (Q_S^T G_z Q_A) ** 2 per layer, via the dispatched contraction, over this
    rank's shard of the examples, then summed over ranks; ``replay`` (a prefix store) replays or records
    the prefix per batch."""
    device = layers[0].module.weight.device
    sums = [torch.zeros(l.d_out, l.folded_in, dtype=dtype, device=device) for l in layers]
    generator = _generator(layers, seed, 1)
    shard = shard_range(len(examples))
    with fail_together("the EK-FAC eigenvalue-correction pass"), TokenCapture(model, layers) as capture, \
            prefix_pass(replay, model, layers) as prefix:
        for number, (rows, batch) in enumerate(padded_batches(examples[shard.start:shard.stop], batch_size,
                                                               "EK-FAC eigenvalue correction", progress,
                                                               task.collate)):
            rows = [shard.start + row for row in rows]

            def on_layer(i, a, g):
                q_a, q_s = bases[layers[i].name]
                if matmul_dtype is not None:
                    a, g = a.to(matmul_dtype), g.to(matmul_dtype)
                sums[i] += projected_gradient_squares(a, g, q_a, q_s).to(dtype)

            with prefix.batch(batch):
                capture.run(_training_objective(model, task, batch, fisher, generator), task.token_mask(batch),
                            describe_rows("training set", number, rows), on_layer)
    all_reduce_sum_(sums)
    return {l.name: sums[i] for i, l in enumerate(layers)}


def factor_dtype(layers: list[TrackedLayer]) -> torch.dtype:
    """float64 when the analysed layers are float64, float32 otherwise."""
    return torch.float64 if layers[0].module.weight.dtype == torch.float64 else torch.float32


def data_digest(examples: list[Example]) -> str:
    """BLAKE2b digest of the examples' ``input_ids`` and ``labels`` (identifies a training set)."""
    digest = hashlib.blake2b(digest_size=16)
    for ex in examples:
        for key in ("input_ids", "labels"):
            value = ex.get(key)
            digest.update(b"-" if value is None else value.detach().cpu().to(torch.int64).contiguous().numpy())
        digest.update(b";")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------

def _save_covariances(directory: Path, covariances: dict, arguments: dict, fingerprint: dict) -> None:
    tensors = {}
    for name, (a_sum, s_sum, _) in covariances.items():
        tensors[f"{name}/a_sum"] = a_sum
        tensors[f"{name}/s_sum"] = s_sum
    storage.save_paired(directory, "covariances", tensors, {
        "format": FORMAT, "stage": "covariance", "arguments": _stage_identity(arguments), "fingerprint": fingerprint,
        "n_tokens": {name: n for name, (_, _, n) in covariances.items()}})


def _load_covariances(directory: Path, arguments: dict, fingerprint: dict, device: torch.device) -> dict | None:
    """The checkpointed covariance sums (on ``device``), or None when there is no complete checkpoint (an
    interrupted save is reported in a warning and recomputed). A checkpoint made with another model,
    data or arguments raises ``ValueError`` (it is never silently mixed in)."""
    meta = storage.load_paired_metadata(directory, "covariances")
    if meta is None:
        return None
    expected = {"format": FORMAT, "arguments": _stage_identity(arguments), "fingerprint": fingerprint}
    differ = [key for key in expected if meta.get(key) != expected[key]]
    if differ:
        detail = differ
        if "arguments" in differ:
            detail = [k for k in expected["arguments"] if meta["arguments"].get(k) != expected["arguments"][k]]
        raise ValueError(f"the covariance checkpoint in {directory} was made with a different model, data or "
                         f"arguments (differs in {detail}); delete it or pass another checkpoint_dir")
    tensors = storage.load_paired_tensors(directory, "covariances", meta)
    if tensors is None:
        warnings.warn(f"the covariance checkpoint in {directory} is incomplete (its files come from "
                      f"different saves); recomputing the covariances", stacklevel=3)
        return None
    return {name: (tensors[f"{name}/a_sum"].to(device), tensors[f"{name}/s_sum"].to(device), n)
            for name, n in meta["n_tokens"].items()}


def _stage_identity(arguments: dict) -> dict:
    """The arguments that determine the covariance stage's result."""
    keys = ("fisher", "batch_size", "max_examples", "seed", "n_examples", "modules", "data_digest", "world_size")
    return {key: arguments[key] for key in keys}


def _versions() -> dict:
    versions = {"trustrepair": __import__("trustrepair").__version__, "torch": torch.__version__,
                "python": platform.python_version()}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return versions
