"""The library's GPU tunables, chosen from gpu_check's own tables and applied for a second pipeline run.

Each tunable below was set before a GPU measured its alternatives; gpu_check's earlier stages time those
alternatives directly. :func:`choose` reads the tables, :func:`applied` sets the choices for the duration
of a run (through :func:`trustrepair.engine.tunables.override`), so one device call measures the pipeline
with the defaults and with the choices, and the session reading the result only commits the defaults that
won there.

* ``GRAM_BLOCK_CUDA``, the tunable ``gram_block["cuda"]`` (256 | 1024 | None, the full product): "gram
  upper 256", "gram upper 1024" and the full product "gram aligned" (TF32);
* ``PAD_WIDTHS_CUDA``, ``pad_widths["cuda"]`` (True | False): "gram upper 1024 padded" plus "projection
  padded" against "gram upper 1024" plus "projection aligned" (TF32), the fit's two products with and
  without the zero-padding;
* ``EIGH_STREAMS`` and ``EIGH_HOST_BELOW``, ``eigh_streams`` (1 | the stage's workers) and
  ``eigh_host_below`` (0 | :data:`EIGH_HOST_WIDTH`), together: the fastest of the eigh schedules
  "sequential" (1, 0), "streams" (workers, 0) and "streams + host" (workers, 1024);
* ``TRITON_OPS``, ``triton_ops``: "projected_gradient_squares" is routed to Triton when its kernel's TF32
  times (op ``squares``), summed over the layers, are below its reference's.

A choice leaves its default only when it beats the default's measurement by more than :data:`MARGIN`.

Row-alignment widths are weighted by how many of one Pythia-160M block's covariance factors and
projections have that width (:data:`WIDTH_WEIGHTS`: 768 twice, 769 three times, 3072 twice counting
qkv's 2304, 3073 once); other widths (the CPU smoke run's) weigh 1.
"""
from __future__ import annotations

import contextlib

from trustrepair.engine.tunables import current, override

MARGIN = 0.02
"""The fraction by which an alternative must beat the default to replace it: the first H100 run of this
choice (2026-11-27) picked ``TF32_ROUNDING = "kernel"`` (a setting since removed) on 4.417 ms against 4.446
(0.6 %), inside ``do_bench``'s run-to-run spread, and the pipeline run with it was no faster."""

WIDTH_WEIGHTS = {768: 2, 769: 3, 3072: 2, 3073: 1}

EIGH_HOST_WIDTH = 1024
"""The ``eigh_host_below`` that the "streams + host" schedule runs: Pythia-160M's 768 / 769-wide factors
on the host, its 2304-3073-wide ones on the device."""

SETTINGS = {"GRAM_BLOCK_CUDA": lambda value: {"gram_block": {"cuda": value}},
            "PAD_WIDTHS_CUDA": lambda value: {"pad_widths": {"cuda": value}},
            "EIGH_STREAMS": lambda value: {"eigh_streams": value},
            "EIGH_HOST_BELOW": lambda value: {"eigh_host_below": value},
            "TRITON_OPS": lambda value: {"triton_ops": value}}
"""Choice name -> the :func:`trustrepair.engine.tunables.override` arguments that apply a value of it."""

TRITON_KERNEL_OPS = {"projected_gradient_squares": ("squares",)}
"""Routable operation -> the kernel-table ops whose times decide it."""


def choose(res: dict) -> dict[str, dict]:
    """name -> {"value", "default", "evidence"} for every tunable whose alternatives ``res`` (gpu_check's
    results) measured; evidence holds each option's summed milliseconds (seconds for the eigh schedules)."""
    defaults = current()
    choices = {}
    records = [r for r in (res.get("kernels") or {}).get("records", []) if r.get("precision") == "tf32"]

    def kernel_ms(op, provider="trustrepair"):
        times = [r[provider]["ms"] for r in records if r["op"] == op and (r.get(provider) or {}).get("ms")]
        return sum(times) if times else None

    rows = {int(key.split()[0]): row for key, row in (res.get("row_alignment") or {}).items()
            if key.endswith("tf32")}

    def weighted(column):
        if not rows or any(row.get(column) is None for row in rows.values()):
            return None
        return sum(WIDTH_WEIGHTS.get(width, 1) * row[column] for width, row in rows.items())

    _pick(choices, "GRAM_BLOCK_CUDA", defaults.gram_block["cuda"],
          {256: weighted("gram upper 256"), 1024: weighted("gram upper 1024"), None: weighted("gram aligned")})

    padded, plain = weighted("gram upper 1024 padded"), weighted("gram upper 1024")
    padded_projection, plain_projection = weighted("projection padded"), weighted("projection aligned")
    if None not in (padded, plain, padded_projection, plain_projection):
        _pick(choices, "PAD_WIDTHS_CUDA", defaults.pad_widths["cuda"],
              {True: padded + padded_projection, False: plain + plain_projection})

    schedules = res.get("eigh_schedules") or {}
    workers = schedules.get("workers", defaults.eigh_streams)
    settings = {"sequential": (1, 0), "streams": (workers, 0), "streams + host": (workers, EIGH_HOST_WIDTH)}
    seconds = {name: schedules[name]["seconds"] for name in settings if isinstance(schedules.get(name), dict)}
    if len(seconds) == len(settings):
        current_setting = (defaults.eigh_streams, defaults.eigh_host_below)
        best = _fastest(seconds, next((name for name, setting in settings.items() if setting == current_setting), None))
        for name, value, default in (("EIGH_STREAMS", settings[best][0], defaults.eigh_streams),
                                     ("EIGH_HOST_BELOW", settings[best][1], defaults.eigh_host_below)):
            choices[name] = {"value": value, "default": default, "evidence": seconds}

    ops = set(defaults.triton_ops)
    evidence = {}
    for name, kernel_ops in TRITON_KERNEL_OPS.items():
        ours = [kernel_ms(op) for op in kernel_ops]
        reference = [kernel_ms(op, "reference") for op in kernel_ops]
        if None in ours or None in reference:
            continue
        evidence[name] = {"triton": sum(ours), "reference": sum(reference)}
        ops = ops | {name} if _fastest(evidence[name], "triton" if name in ops else "reference") == "triton" \
            else ops - {name}
    if evidence:
        choices["TRITON_OPS"] = {"value": frozenset(ops), "default": defaults.triton_ops, "evidence": evidence}
    return choices


def _pick(choices: dict, name: str, default, options: dict) -> None:
    """The fastest measured option (:func:`_fastest`), when every option was measured."""
    if options and None not in options.values():
        choices[name] = {"value": _fastest(options, default), "default": default, "evidence": options}


def _fastest(options: dict, default):
    """The option with the smallest measurement, unless that beats ``default``'s by :data:`MARGIN` or less
    (then ``default``; also when ``default`` is not among the options, the fastest)."""
    best = min(options, key=options.get)
    if default in options and options[best] >= (1 - MARGIN) * options[default]:
        return default
    return best


def changed(choices: dict[str, dict]) -> dict:
    """name -> value for the choices that differ from today's defaults."""
    return {name: c["value"] for name, c in choices.items() if c["value"] != c["default"]}


@contextlib.contextmanager
def applied(values: dict):
    """Sets the named tunables (names as :func:`choose` returns them) for the block, then restores them."""
    unknown = set(values) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown tunables {sorted(unknown)}; known: {sorted(SETTINGS)}")
    changes = {setting: change for name, value in values.items() for setting, change in SETTINGS[name](value).items()}
    with override(**changes):
        yield


def describe(choices: dict[str, dict]) -> list[str]:
    """One line per measured tunable: the choice, today's default and the evidence."""
    def show(value):
        if isinstance(value, frozenset):
            return sorted(value)
        return "full" if value is None else value

    lines = []
    for name, c in choices.items():
        verdict = "keep the default" if c["value"] == c["default"] else "CHANGE"
        evidence = {show(option): (round(v, 4) if isinstance(v, float) else v) for option, v in c["evidence"].items()}
        lines.append(f"- {name}: {show(c['value'])} (default {show(c['default'])}; {verdict}); measured {evidence}")
    return lines
