"""The plan ``convforge tune`` writes and ``predict``/``bench``/``serve --plan`` run.

    plan = Plan.read("plan.json")                  # UserError: missing, not JSON, not a plan
    with plan.load_model(batch_size=1) as model:   # the entry for batch 1, exactly as tuned
        model.predict(["cat.jpg"])

A plan holds, per batch size, the fastest configuration that stayed within
the accuracy budget (:class:`PlanEntry`: backend, file, the backend options to
pass, the settings that ran, p50/p99, throughput, accuracy delta), every
candidate measured with its outcome, and the environment it was measured in
(:func:`convforge.runtime.bench.environment`). The file is JSON with the keys
of these dataclasses, in field order, written atomically; model paths in it
are relative to the plan's folder, so a folder of models and plan can move
as a whole.

:meth:`Plan.entry` picks the entry closest to a batch size on a log scale (4
is closer to 8 than to 1; ties go to the larger). Running a plan on another
CPU, core count, GPU, convforge version or version of a library the plan's
backends use, or on a model file that changed since tuning, warns
(:class:`PlanWarning`): the choice still runs but may not be the fastest or
the accuracy checked. A plan whose file is gone is a UserError.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from convforge import __version__
from convforge.contract import sha256_of
from convforge.errors import UserError, check_int
from convforge.files import atomic_write
from convforge.runtime import bench
from convforge.runtime.backends import BACKENDS

FORMAT = "convforge-plan/1"
MACHINE_KEYS = ("cpu", "logical_cores", "gpu")  # bench.environment() keys a plan depends on
LIBRARY_OF = {  # backend -> the library whose version its speed depends on
    "ort-cpu": "onnxruntime",
    "ort-cuda": "onnxruntime",
    "ort-trt": "onnxruntime",
    "tensorrt": "tensorrt",
    "openvino": "openvino",
    "torch": "torch",
}


class PlanWarning(UserWarning):
    """The plan was measured elsewhere (machine, libraries) or on another version of the
    file: it runs, but its choice may not hold here."""


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
    """A tuned plan: :meth:`write`/:meth:`read` JSON, :meth:`entry`, :meth:`load_model`."""

    model: str  # the fp32 reference file
    files: dict[str, str]  # every file tuned (reference first) -> its sha256
    entries: list[PlanEntry]  # one per batch size that has a choice, ascending
    accuracy: dict  # metric (top1|agreement), dataset, images, reference, max_drop_points, ...
    search: dict  # batch_sizes, budget_seconds, seconds, rounds, notes, ...
    environment: dict  # bench.environment() where it was measured
    candidates: list[dict] = field(default_factory=list)  # every candidate x batch size
    skipped: list[str] = field(default_factory=list)  # backends that could not take part, why
    convforge_version: str = __version__
    created: str = ""  # UTC, ISO 8601
    format: str = FORMAT

    # -- file ------------------------------------------------------------------------------

    def write(self, path) -> None:
        """Write the plan to ``path`` atomically (model paths relative to its folder)."""
        folder = Path(path).resolve().parent
        data = {"format": self.format, **dataclasses.asdict(self)}  # format first: says what it is
        data["model"] = _relative(self.model, folder)
        data["files"] = {_relative(f, folder): h for f, h in self.files.items()}
        for record in (*data["entries"], *data["candidates"]):
            record["file"] = _relative(record["file"], folder)
        with atomic_write(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    @classmethod
    def read(cls, path) -> Plan:
        """The plan in ``path``; a one-line UserError when it is missing, unreadable, not a
        convforge plan, or has an entry that does not fit the schema."""
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
        plan = _typed(cls, {**data, "entries": []}, str(path))
        plan.entries = [
            _typed(PlanEntry, e, f"{path}: entry {i + 1}")
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
        plan.model = str(folder / plan.model)
        plan.files = {str(folder / f): h for f, h in plan.files.items()}
        plan.entries = [dataclasses.replace(e, file=str(folder / e.file)) for e in plan.entries]
        for c in plan.candidates:
            if isinstance(c, dict) and isinstance(c.get("file"), str):
                c["file"] = str(folder / c["file"])
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
        env = bench.environment() if env is None else env
        env = {**env, "convforge_version": __version__}
        then = {**self.environment, "convforge_version": self.convforge_version}
        libraries = [f"{LIBRARY_OF[e.backend]}_version" for e in self.entries]
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
        """UserError when ``entry``'s file is missing; PlanWarning when it changed since."""
        path = Path(entry.file)
        if not path.is_file():
            raise UserError(f"the plan's file {path} is missing (the plan runs that file)")
        expected = self.files.get(entry.file)
        if expected is not None and sha256_of(path) != expected:
            warnings.warn(
                f"{path} changed since it was tuned (sha256 differs): its accuracy was not "
                "checked; re-run `convforge tune`",
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

    def load_model(self, batch_size: int = 1, check: bool = True):
        """A :class:`~convforge.runtime.model.Model` running :meth:`entry` (``batch_size``):
        its backend, file and options, with ``Model.batch_size`` = the entry's batch size.
        ``check``: warn on a different environment first (:meth:`check_environment`)."""
        from convforge.runtime.model import load

        entry = self.entry(batch_size)
        self.check_file(entry)
        if check:
            self.check_environment()
        return load(entry.file, backend=entry.backend, batch_size=entry.batch_size,
                    **entry.options)  # fmt: skip


def bench_plan(plan: Plan, cfg: bench.BenchConfig, labelled=None) -> list[dict]:
    """Bench records of ``plan``'s configuration at each of ``cfg.batch_sizes`` (the entry
    closest to each), like :func:`~convforge.runtime.bench.bench_matrix`'s, plus
    ``plan_batch_size``; ``labelled`` (raw images, labels) adds ``top1_accuracy``."""
    records = []
    for bs in cfg.batch_sizes:
        entry = plan.entry(bs)
        plan.check_file(entry)
        one = dataclasses.replace(cfg, batch_sizes=(bs,))
        rs = bench.bench_backend(entry.backend, entry.file, one, **entry.options)
        if labelled is not None:
            acc = bench.accuracy(entry.backend, entry.file, *labelled, **entry.options)
            rs = [{**r, "top1_accuracy": acc} for r in rs]
        records += [{"model": entry.file, "plan_batch_size": entry.batch_size, **r} for r in rs]
    return records


def _relative(path: str, folder: Path) -> str:
    """``path`` relative to ``folder`` when inside it (they move together), else absolute."""
    path = Path(path).resolve()
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def _typed_list(value, where: str) -> list:
    if not isinstance(value, list):
        raise UserError(f"{where} must be a list")
    return value


_CHECKS = {int: (int,), float: (int, float), str: (str,), dict: (dict,), list: (list,)}


def _typed(cls, data, where: str):
    """``cls(**data)`` after checking that ``data`` is an object holding every field of
    ``cls`` without a default, and nothing else, each of the annotated type."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a JSON object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where} has unknown keys {unknown}; accepted: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{where} lacks {name!r}")
            continue
        kind = typing.get_origin(hints[name]) or hints[name]
        ok = _CHECKS.get(kind, (object,))
        value = data[name]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, ok):
            raise UserError(f"{where}: {name!r} must be {kind.__name__}, got {value!r}")
    return cls(**data)
