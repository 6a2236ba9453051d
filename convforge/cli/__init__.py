"""``convforge <command>``: parses arguments, calls the parts, prints; no logic of its own.

One module per command group: :mod:`.builder` (models, diagnose, train,
finetune, compress, augment-preview), :mod:`.export` (export), :mod:`.runtime` (inspect,
annotate, predict, bench, backends, serve), :mod:`.tune` (tune), :mod:`.plan`
(``--plan`` for predict, bench and serve) and :mod:`.pipeline` (pipeline, demo).
A command's parser is built only when that command runs, from the settings
dataclasses of the part it calls (:mod:`.arguments`): ``convforge predict``
never imports torch, and a command whose extra is not installed says which one in
a line before anything else happens (:mod:`convforge.extras`).

Every command exits 0 on success, 2 with one line ``convforge: error: ...``
on a user mistake (no traceback, no usage dump), and 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from dataclasses import dataclass

from convforge import __version__, extras
from convforge.cli.arguments import Parser
from convforge.errors import UserError, check_choice

TRAIN = ("torch", "torchvision", "sklearn", "matplotlib")  # what builder commands import
EXPORT = (*TRAIN, "onnxscript", "onnxruntime")  # + the exporter and the validating engine
PIPELINE = (*EXPORT, "onnxconverter_common", "yaml")  # + fp16 variants, the recipe file


@dataclass(frozen=True)
class Command:
    group: str  # module of convforge.cli whose PARSERS[name] builds the parser
    summary: str  # one line for `convforge --help`
    needs: tuple[str, ...] = ()  # modules it cannot start without (names in extras.EXTRA_OF)


COMMANDS = {
    "models": Command("builder", "list every model with parameters and compute", ("torch",)),
    "diagnose": Command("builder", "diagnostic experiments (init)", ("torch", "matplotlib")),
    "train": Command("builder", "train a model (default: small ResNet-18 on digits)", TRAIN),
    "finetune": Command("builder", "transfer learning from a checkpoint or weights file", TRAIN),
    "compress": Command(
        "builder",
        "prune + fine-tune a checkpoint to fewer MACs within an accuracy budget",
        (*TRAIN, "torch_pruning"),
    ),  # fmt: skip
    "augment-preview": Command("builder", "PNG grid of augmented training samples", TRAIN),
    "export": Command("export", "checkpoint -> BatchNorm-folded, validated ONNX", EXPORT),
    "inspect": Command("runtime", "what an ONNX file holds"),
    "annotate": Command("runtime", "write labels and preprocessing into a foreign ONNX file"),
    "predict": Command("runtime", "top-k classes of images with an exported model"),
    "bench": Command("runtime", "latency/throughput per backend x precision x batch size"),
    "backends": Command("runtime", "each backend's options, and whether it runs here"),
    # kserve through convforge's import of it: gRPC's settings and sys.argv come first
    "serve": Command(
        "runtime",
        "serve models over KServe v2 (HTTP, gRPC)",
        ("convforge.runtime.serve.kserve_sdk", "kserve"),
    ),  # fmt: skip
    "tune": Command("tune", "fastest backend x precision x settings per batch size: a plan"),
    "pipeline": Command("pipeline", "a recipe from data to a deployment decision", PIPELINE),
    "demo": Command("pipeline", "the default recipe (digits), ending in a report", PIPELINE),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``convforge`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv else ""
    with _warnings_as_lines():
        try:
            return _run(argv)
        except UserError as e:
            print(f"convforge: error: {e}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            # The reader left (`convforge inspect m.onnx | head`): stop quietly, as cat does;
            # stdout goes to devnull so the interpreter's final flush cannot raise again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE, the status a shell reports for this
        except ModuleNotFoundError as e:
            # A library the command's `needs` did not list; still one line, never a traceback.
            module = (e.name or "").split(".")[0]
            if module not in extras.EXTRA_OF:
                raise
            message = extras.missing_message(f"convforge {name}", module)
            print(f"convforge: error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("convforge: interrupted", file=sys.stderr)
            return 130


def _run(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        overview().parse_args(argv)  # --help and --version exit here
        raise UserError(
            f"a command is needed; choose one of: {', '.join(COMMANDS)} (see 'convforge --help')"
        )
    name = check_choice("command", argv[0], list(COMMANDS))
    command = COMMANDS[name]
    extras.require(f"convforge {name}", *command.needs)
    group = importlib.import_module(f"convforge.cli.{command.group}")
    parser = Parser(prog=f"convforge {name}")
    group.PARSERS[name](parser)
    args = parser.parse_args(argv[1:])
    return args.func(args)


def overview() -> argparse.ArgumentParser:
    """The top-level parser: ``--help`` lists the commands, ``--version``."""
    parser = Parser(
        prog="convforge",
        description="Train VGG/ResNet image classifiers, export validated ONNX, "
        "and run them fast with honest latency numbers.",
        epilog="'convforge COMMAND --help' explains a command.",
    )
    parser.add_argument("--version", action="version", version=f"convforge {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND", title="commands")
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.summary)
    return parser


@contextlib.contextmanager
def _warnings_as_lines():
    """Show convforge's own warnings as one ``convforge: warning: ...`` line each."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("convforge."):  # InstallWarning, PlanWarning, ...
            print(f"convforge: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original
