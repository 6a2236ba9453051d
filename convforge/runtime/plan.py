"""The plan ``convforge tune`` writes and ``predict``/``bench``/``serve --plan`` run.

    plan = Plan.read("plan.json")                  # UserError: missing, not JSON, not a plan
    with load_plan(plan, batch_size=1) as model:   # convforge.runtime.model.load_plan: the
        model.predict(["cat.jpg"])                 # entry for batch 1, exactly as tuned

A plan holds, per batch size, the fastest configuration that stayed within
the accuracy budget (:class:`PlanEntry`: backend, file, the backend options to
pass, the settings that ran, p50/p99, throughput, accuracy delta), every
candidate measured with its outcome, and the environment it was measured in
(:func:`convforge.runtime.environment.environment`). The file is JSON with the keys
of these dataclasses, in field order, written atomically.

A plan decides which files run, and a ``.pt2`` program is code, so a plan only
points inside its own folder: its paths are relative to it, without ``..``
(so a folder of models and plan can move as a whole); an absolute path or one
with ``..`` is a UserError on reading, and a file outside the folder one on
writing (:func:`plan_path`). The sha256 of every file it runs is recorded (for
the torch backend the ``.pt2`` beside the ``.onnx`` too): running a file that
changed since tuning, or whose hash the plan lacks, is a UserError, unless
:attr:`Plan.force` (``--force-plan``) lowers it to a :class:`PlanWarning`.

:meth:`Plan.entry` picks the entry closest to a batch size on a log scale (4
is closer to 8 than to 1; ties go to the larger). Running a plan on another
CPU, core count, GPU, convforge version or version of a library the plan's
backends use warns (:class:`PlanWarning`): the choice still runs but may not be
the fastest. A plan whose file is gone is a UserError.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from convforge import __version__
from convforge.contract import sha256_of
from convforge.errors import UserError, check_int
from convforge.files import atomic_write
from convforge.runtime.backends import BACKENDS, backend_class
from convforge.runtime.environment import environment
from convforge.settings import parse

FORMAT = "convforge-plan/1"
MACHINE_KEYS = ("cpu", "logical_cores", "gpu")  # environment() keys a plan depends on


class PlanWarning(UserWarning):
    """The plan was measured elsewhere (machine, libraries), or runs a changed file because
    the user forced it: it runs, but its choice may not hold here."""


@dataclass(frozen=True)
class PlanEntry:
    """The configuration chosen for one batch size, and what it measured."""

    batch_size: int  # the batch size it was timed at
    backend: str  # a name of BACKENDS
    file: str  # the model file it runs (absolute in memory, relative to the plan on disk)
    precision: str  # the precision that ran (the backend's report, e.g. fp32, int8, bf16)
    options: dict  # backend options, exactly as given to backends.create
    settings: dict  # the backend's describe() while it was timed: every setting that ran
    p50_ms: float  # median over interleaved rounds of each round's median latency
    p99_ms: float  # 99th percentile over every timed run
    throughput_ips: float  # images/s at p50: batch_size * 1000 / p50_ms
    accuracy: float  # top-1 (or top-1 agreement with the fp32 file) on the checked images
    accuracy_delta_points: float  # accuracy minus the fp32 reference's, in percentage points


@dataclass
class Plan:
    """A tuned plan: :meth:`write`/:meth:`read` JSON, :meth:`entry`
    (:func:`~convforge.runtime.model.load_plan` runs one)."""

    model: str  # the fp32 reference file
    files: dict[str, str]  # every file tuned (reference first) -> its sha256
    entries: list[PlanEntry]  # one per batch size that has a choice, ascending
    accuracy: dict  # metric (top1|agreement), dataset, images, reference, max_drop_points, ...
    search: dict  # batch_sizes, budget_seconds, seconds, rounds, notes, ...
    environment: dict  # environment() where it was measured
    candidates: list[dict] = field(default_factory=list)  # every candidate x batch size
    skipped: list[str] = field(default_factory=list)  # backends that could not take part, why
    convforge_version: str = __version__
    created: str = ""  # UTC, ISO 8601
    format: str = FORMAT

    def __post_init__(self) -> None:
        # Not a field, so never in the file: whether to run files that changed since tuning
        # is the user's call (--force-plan), not something a plan can say about itself.
        self.force = False

    # -- file ------------------------------------------------------------------------------

    def write(self, path) -> None:
        """Write the plan to ``path`` atomically, model paths relative to its folder
        (UserError, before writing, for a file outside it)."""
        data = {"format": self.format, **dataclasses.asdict(self)}  # format first: says what it is
        data["model"] = plan_path(self.model, path)
        data["files"] = {plan_path(f, path): h for f, h in self.files.items()}
        for record in (*data["entries"], *data["candidates"]):
            record["file"] = plan_path(record["file"], path)
        with atomic_write(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    @classmethod
    def read(cls, path) -> Plan:
        """The plan in ``path``; a one-line UserError when it is missing, unreadable, not a
        convforge plan, has an entry that does not fit the schema, or names a file by an
        absolute path or one with ``..``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(
                f"plan {path} does not exist (make one with `convforge tune`)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read plan {path}: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(
                f'{path} is not a convforge plan (no "format": "{FORMAT}"); '
                "make one with `convforge tune`"
            )
        folder = path.resolve().parent
        plan = parse(cls, {**data, "entries": []}, f"{path}: ")
        plan.entries = [
            parse(PlanEntry, e, f"{path}: entry {i + 1}: ")
            for i, e in enumerate(_typed_list(data.get("entries"), f"{path}: entries"))
        ]
        if not plan.entries:
            raise UserError(f"{path}: the plan has no entries (every candidate failed?)")
        for e in plan.entries:
            if e.backend not in BACKENDS:
                raise UserError(
                    f"{path}: unknown backend {e.backend!r}; choose one of: {', '.join(BACKENDS)}"
                )
            check_int(f"{path}: batch_size", e.batch_size)
        plan.model = _inside(folder, plan.model, f"{path}: model")
        plan.files = {_inside(folder, f, f"{path}: files"): h for f, h in plan.files.items()}
        plan.entries = [
            dataclasses.replace(e, file=_inside(folder, e.file, f"{path}: entry {i + 1}: file"))
            for i, e in enumerate(plan.entries)
        ]
        for i, c in enumerate(plan.candidates):
            if isinstance(c, dict) and isinstance(c.get("file"), str):
                c["file"] = _inside(folder, c["file"], f"{path}: candidate {i + 1}: file")
        return plan

    # -- use -------------------------------------------------------------------------------

    def entry(self, batch_size: int) -> PlanEntry:
        """The entry closest to ``batch_size`` on a log scale; ties go to the larger."""
        check_int("batch size", batch_size)
        return min(
            self.entries,
            key=lambda e: (abs(math.log(e.batch_size) - math.log(batch_size)), -e.batch_size),
        )

    def mismatches(self, env: dict | None = None) -> list[str]:
        """What differs between the plan's environment and ``env`` (default: here), one
        ``"key: then -> now"`` string each: the CPU, its logical cores, the GPU, convforge,
        and the libraries of the plan's backends."""
        env = environment() if env is None else env
        env = {**env, "convforge_version": __version__}
        then = {**self.environment, "convforge_version": self.convforge_version}
        libraries = [f"{backend_class(e.backend).library}_version" for e in self.entries]
        keys = dict.fromkeys([*MACHINE_KEYS, "convforge_version", *libraries])
        return [
            f"{k.removesuffix('_version')}: {then.get(k, 'none')} -> {env.get(k, 'none')}"
            for k in keys
            if then.get(k) != env.get(k)
        ]

    def check_environment(self, env: dict | None = None) -> list[str]:
        """Warn (:class:`PlanWarning`, once) when :meth:`mismatches` finds any; returns them."""
        found = self.mismatches(env)
        if found:
            warnings.warn(
                f"the plan was measured elsewhere ({'; '.join(found)}): its choice may not be "
                "the fastest here; re-run `convforge tune` on this machine",
                PlanWarning,
                stacklevel=2,
            )
        return found

    def check_file(self, entry: PlanEntry) -> None:
        """Check every file ``entry`` runs (``Backend.reads``: for torch the ``.pt2`` too):
        UserError when one is missing, and when one changed since tuning or has no hash in
        the plan, unless :attr:`force` (then a PlanWarning)."""
        for file in backend_class(entry.backend).reads(entry.file):
            path = Path(file)
            if not path.is_file():
                raise UserError(f"the plan's file {path} is missing (the plan runs that file)")
            expected = self.files.get(file)
            if expected is not None and sha256_of(path) == expected:
                continue
            why = "changed since it was tuned (sha256 differs)"
            if expected is None:
                why = "has no sha256 in the plan"
            if not self.force:
                raise UserError(
                    f"{path} {why}: it is not what was tuned and checked; re-run `convforge "
                    "tune`, or give --force-plan to run it anyway"
                )
            warnings.warn(
                f"{path} {why}: running it as forced; its accuracy was not checked",
                PlanWarning,
                stacklevel=2,
            )

    def check_model(self, path) -> None:
        """UserError unless ``path`` is a file this plan was made for (same path or same
        content as the reference or one of its variants)."""
        path = Path(path)
        if str(path.resolve()) in self.files:
            return
        if path.is_file() and sha256_of(path) in self.files.values():
            return
        names = ", ".join(Path(f).name for f in self.files)
        raise UserError(f"the plan was made for {names}, not {path}")


def plan_path(file, plan) -> str:
    """``file`` as a plan written to ``plan`` names it: relative to the plan's folder
    (POSIX separators). UserError when ``file`` is outside that folder: a plan may only
    name files inside its own folder (:meth:`Plan.read` refuses anything else)."""
    folder = Path(plan).resolve().parent
    path = Path(file).resolve()
    if not path.is_relative_to(folder):
        raise UserError(
            f"{file} is outside {folder}, the folder of plan {Path(plan).name}: a plan names "
            "files inside its own folder only; write the plan beside the models or above them"
        )
    return path.relative_to(folder).as_posix()


def _inside(folder: Path, name, where: str) -> str:
    """``folder / name`` for a path read from a plan; UserError unless ``name`` is a path
    relative to the plan's folder without ``..`` (Windows spellings included)."""
    parts = PureWindowsPath(name) if isinstance(name, str) else None  # either separator
    if parts is None or not name or parts.anchor or ".." in parts.parts:
        raise UserError(
            f"{where} is {name!r}; a plan accepts only paths relative to its own folder, "
            "without '..' (make a new one with `convforge tune`)"
        )
    return str(folder / name)


def _typed_list(value, where: str) -> list:
    if not isinstance(value, list):
        raise UserError(f"{where} must be a list")
    return value
