"""``trustrepair`` command line: one subcommand per pipeline stage, plus ``demo`` (all of them).

    trustrepair demo [--out runs/demo] [options]      every stage, then report.md
    trustrepair sft | fit | score | select | repair | evaluate | report [--out DIR] [options]

``demo`` runs the planted scenario by default (``--planted 32`` examples per aspect, ``--seeds 3``, each seed
in ``OUT/seed-N``, the report over the seeds in ``OUT``); ``--planted 0`` runs the clean HH demo in ``OUT``.
A stage subcommand works on one run directory: a clean demo's, one seed's of a planted demo, or a new
one-seed planted run (``--seeds 1``).

Each stage subcommand runs the stages up to that one in order, each once
(:func:`trustrepair.app.pipeline.run_stages`): a stage whose output is already in the run directory is
read back, the others are computed; then it prints where its output is. The options are generated
from :class:`trustrepair.app.settings.DemoConfig`
(one ``--kebab-case`` option per field, its help text from the field's metadata). Options left out
take the values saved in ``DIR/config.json`` when the run directory already exists (so later stages
need no repeated options), the ``DemoConfig`` defaults otherwise; an option that contradicts the
saved settings is refused rather than mixing results of different settings.

Exit codes: 0 success; 2 bad usage or input (argument errors, ``ValueError`` including the data
module's ``DataError`` and damaged run files, ``FileNotFoundError``, ``FloatingPointError``), reported as one line on stderr (with the traceback
at ``--log-level DEBUG``); 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import types
import typing
from pathlib import Path
from typing import Sequence

from trustrepair.app.settings import AttributeConfig, DemoConfig, RepairOptions

logger = logging.getLogger("trustrepair")

DEFAULT_OUT = "runs/demo"
DEFAULT_ATTRIBUTE_OUT = "runs/attribute"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# trustrepair.data.DataError and storage.DamagedFileError are ValueErrors; FloatingPointError: a non-finite
# loss, gradient or weight, named by the library
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)

# subcommand (a stage of trustrepair.app.pipeline.STAGE_ORDER) -> (what it leaves in the run directory,
# one-line description)
STAGES = {
    "sft": ("sft", "fine-tune the last blocks on the SFT split; evaluate pre- and post-SFT"),
    "fit": ("factors", "fit EK-FAC factors on the fine-tuned blocks' linear layers"),
    "score": ("scores.safetensors", "influence of every SFT example on every aspect + embeddings"),
    "select": ("selection.json", "choose the repair subsets (dpp, topk, random; common)"),
    "repair": ("repairs.json", "Newton repair per subset with the beta search; saved deltas"),
    "evaluate": ("evaluation.json", "pre / post / repaired on both halves of every aspect"),
    "report": ("report.md", "tables, beta-sweep figure and top detrimental examples"),
}


# subcommands that, in a run directory made by `attribute`, continue the user's workflow
WORKFLOW_HELP = {
    "repair": "repair an attributed model: subset, Newton step under the perplexity tolerance, optional "
              "--save-model",
    "report": "report.md / report.json of a run (attribute runs: the last repair)",
}
RunDir_ATTRIBUTE = "attribute.json"  # trustrepair.app.rundir.RunDir.ATTRIBUTE_SETTINGS, without importing torch


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line on stderr, exit code 2 (argparse prints the usage block otherwise)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _finite_float(text: str) -> float:
    """A finite float: a NaN or an infinity would be saved as null and reach a weight."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _optional_float(text: str) -> float | None:
    """A finite float, or ``none`` for the field's automatic choice."""
    if text.strip().lower() == "none":
        return None
    try:
        return _finite_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a finite number or 'none', got {text!r}") from None


def _option_kwargs(name: str, annotation) -> dict:
    """argparse keywords for one DemoConfig field, from its resolved type annotation.

    ``T | None`` with T a number accepts ``none``; ``tuple[T, ...]`` is ``nargs="+"`` of T.
    """
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"DemoConfig.{name}: unsupported union {annotation}")
        if inner[0] is str:
            return {"type": str, "metavar": name.upper()}
        if inner[0] is float:
            return {"type": _optional_float, "metavar": "FLOAT|none"}
        if inner[0] is int:
            return {"type": int, "metavar": "INT"}
        raise TypeError(f"DemoConfig.{name}: unsupported optional type {inner[0]}")
    if typing.get_origin(annotation) is tuple:
        return {"type": args[0], "nargs": "+", "metavar": name.rstrip("s").upper()}
    if annotation is str:
        return {"type": str, "metavar": name.upper()}
    if annotation is int:
        return {"type": int, "metavar": "INT"}
    if annotation is float:
        return {"type": _finite_float, "metavar": "FLOAT"}
    raise TypeError(f"DemoConfig.{name}: unsupported type {annotation}; extend trustrepair.app.cli._option_kwargs")


def _with_default(help_text: str, value) -> str:
    """The field's help plus its default; a None default's meaning is already in the help text."""
    if value is None:
        return help_text
    return f"{help_text} (default: {' '.join(value) if isinstance(value, tuple) else value})"


def config_options(settings=DemoConfig, title: str = "run settings (saved in DIR/config.json; omitted ones are "
                                                         "read from it)", skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A parent parser with one option per field of the ``settings`` dataclass but ``skip`` (default: not
    given, see :func:`build_settings`)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help")
        if not help_text:
            raise TypeError(f"{settings.__name__}.{f.name} has no 'help' metadata")
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                           help=_with_default(help_text, default),
                           **_option_kwargs(f.name, hints[f.name]))
    return parser


def common_options(default_out: str = DEFAULT_OUT) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=Path, default=Path(default_out), metavar="DIR",
                       help=f"run directory: stage outputs are written and reused there (default: {default_out})")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    group.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                       help="logging level; DEBUG also prints tracebacks (default: INFO)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trustrepair",
                     description="Find the fine-tuning examples that made a language model less trustworthy "
                                 "and repair it (EK-FAC influence, DPP selection, Newton/PBRF repair).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = [config_options(), common_options()]
    commands.add_parser("attribute", parents=[config_options(AttributeConfig, "attribute settings (saved in "
                                                             "DIR/attribute.json; omitted ones are read from it)"),
                                              common_options(DEFAULT_ATTRIBUTE_OUT)],
                        help="your fine-tuned model and its data: EK-FAC factors and every example's influence",
                        description="Attribute a fine-tuned Hugging Face model's trust aspects to its fine-tuning "
                                    "examples: fits EK-FAC factors on the chosen layers and writes DIR/scores.jsonl "
                                    "(positive = detrimental). Then `trustrepair repair --out DIR`.")
    repair_only = config_options(RepairOptions, "repair of an attribute run (with DIR/attribute.json)",
                                 skip=[f.name for f in dataclasses.fields(DemoConfig)])
    repair_only.add_argument("--save-model", type=Path, metavar="DIR2", default=None,
                             help="attribute runs: write the repaired model there as a complete Hugging Face "
                                  "directory (atomically; never the input model)")
    for name, (output, description) in STAGES.items():
        extra = [repair_only] if name == "repair" else []
        commands.add_parser(name, parents=parents + extra, help=WORKFLOW_HELP.get(name, description),
                            description=f"{WORKFLOW_HELP.get(name, description)}. In a demo run directory: "
                                        f"{description}; runs the earlier stages whose outputs are missing and "
                                        f"reuses those present; writes DIR/{output}.")
    commands.add_parser("demo", parents=parents, help="every stage in order, then the report",
                        description="The whole pipeline (sft, fit, score, select, repair, evaluate, report), "
                                    "reusing completed stages; writes DIR/report.md.")
    return parser


def given_options(settings, args: argparse.Namespace) -> dict:
    """The options of the ``settings`` dataclass given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(settings) if hasattr(args, f.name)}


def build_config(args: argparse.Namespace, settings=DemoConfig, file: str = "config.json"):
    """The run's settings: the given options over ``DIR/<file>`` when it exists, else over the defaults.

    An option that differs from a saved setting is kept, so :class:`~trustrepair.app.rundir.RunDir` refuses
    the directory.
    """
    given = given_options(settings, args)
    saved_path = Path(args.out) / file
    if not saved_path.is_file():
        return settings(**given)
    try:
        saved = json.loads(saved_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{saved_path} is not valid JSON ({exc}); delete it or use a new --out directory") from None
    known = {f.name for f in dataclasses.fields(settings)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"{saved_path} has settings this version does not know: {unknown}; "
                         "use a new --out directory")
    return settings(**{**saved, **given})


def _configure_logging(level: str) -> None:
    """trustrepair's messages at ``level``; other libraries' only from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logger.setLevel(level)


def run_workflow(args: argparse.Namespace) -> Path:
    """``attribute``, or ``repair`` / ``report`` in an attribute run directory; returns the output's path."""
    from trustrepair.app import workflow

    progress = not args.quiet
    if args.command == "attribute":
        if (Path(args.out) / "config.json").is_file():
            raise ValueError(f"{args.out} holds a demo run (config.json); attribute into a new --out directory")
        config = build_config(args, AttributeConfig, RunDir_ATTRIBUTE)
        return workflow.attribute(workflow.open_run(args.out, config, progress=progress))
    demo_only = sorted(set(given_options(DemoConfig, args)) - {f.name for f in dataclasses.fields(RepairOptions)})
    if demo_only:
        raise ValueError(f"{args.out} is an attribute run; {', '.join('--' + n.replace('_', '-') for n in demo_only)} "
                         "belong to the demo (its settings are in attribute.json)")
    run = workflow.open_run(args.out, workflow.load_settings(args.out), progress=progress)
    if args.command == "repair":
        return workflow.repair(run, RepairOptions(**given_options(RepairOptions, args)), args.save_model)
    from trustrepair.app.user_report import write_user_report

    return write_user_report(run.dir, run.config, workflow.read_repair(run.dir))


def run_command(args: argparse.Namespace) -> Path:
    """Run one subcommand; returns the path of its output."""
    if args.command == "attribute" or (args.command in WORKFLOW_HELP and (Path(args.out) / RunDir_ATTRIBUTE).is_file()):
        return run_workflow(args)
    if given_options(RepairOptions, args).keys() - {f.name for f in dataclasses.fields(DemoConfig)} or \
            getattr(args, "save_model", None) is not None:
        raise ValueError(f"{args.out} is not an attribute run (no {RunDir_ATTRIBUTE}): --target, --strategy and "
                         "--save-model repair a run made by `trustrepair attribute`")
    if (Path(args.out) / RunDir_ATTRIBUTE).is_file():
        raise ValueError(f"{args.out} holds an attribute run ({RunDir_ATTRIBUTE}); `{args.command}` is a stage of the "
                         "demo: use `trustrepair repair` / `report` there, or a new --out directory")
    config = build_config(args)
    progress = not args.quiet
    if args.command == "demo":
        from trustrepair.app.pipeline import run_demo

        return run_demo(args.out, config, progress=progress)
    if config.planted and config.seeds > 1:
        raise ValueError(f"a planted demo of {config.seeds} seeds keeps each seed's stages in OUT/seed-N: run "
                         f"`trustrepair demo`, or `trustrepair {args.command} --out {args.out}/seed-N` on one of its "
                         "seeds; a new one-seed run takes --seeds 1 (planted) or --planted 0 (the clean demo)")
    from trustrepair.app import pipeline
    from trustrepair.app.rundir import RunDir

    run = RunDir(args.out, config, progress=progress)
    pipeline.run_stages(run, args.command)
    return run.dir / STAGES[args.command][0]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trustrepair`` script and ``python -m trustrepair``; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argument error (2, already reported on one line)
        return int(exc.code or 0)
    _configure_logging(args.log_level)
    if getattr(args, "quiet", False):  # transformers' own bars (loading and writing weights) too
        import transformers

        transformers.utils.logging.disable_progress_bar()
    from trustrepair.engine.distributed import init_from_env, is_distributed

    launched = not is_distributed() and init_from_env()  # under torchrun: one group for the whole command
    try:
        output = run_command(args)
    except USER_ERRORS as exc:
        logger.debug("traceback", exc_info=True)
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"trustrepair {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"trustrepair {args.command}: interrupted; completed stages in {args.out} are reused next time",
              file=sys.stderr)
        return 130
    finally:
        if launched:
            import torch.distributed as dist

            dist.destroy_process_group()
    print(f"trustrepair {args.command}: done; output in {output}")
    return 0
