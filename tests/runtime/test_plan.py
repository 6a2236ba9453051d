"""The plan file: round trip, the entry for a batch size, environment mismatch warnings,
invalid files, and running the planned configuration."""

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest

from convforge.contract import sha256_of
from convforge.errors import UserError
from convforge.runtime import bench, load
from convforge.runtime.bench import bench_plan
from convforge.runtime.environment import environment
from convforge.runtime.model import load_plan
from convforge.runtime.plan import FORMAT, Plan, PlanEntry, PlanWarning

FIXTURES = Path(__file__).parents[1] / "fixtures"
IMAGE = FIXTURES / "digit-0-4.png"  # a 4


def make_plan(folder: Path, sizes=(1, 8), threads=1) -> Plan:
    """A plan for a copy of the digits fixture in ``folder``: ort-cpu with ``threads``
    at each of ``sizes``, measured in this environment (numbers are made up: the plan
    file is under test here, not the search)."""
    model = folder / "digits.onnx"
    shutil.copyfile(FIXTURES / "digits.onnx", model)
    entries = [
        PlanEntry(
            batch_size=bs,
            backend="ort-cpu",
            file=str(model),
            precision="fp32",
            options={"threads": threads},
            settings={"backend": "ort-cpu", "threads": threads},
            p50_ms=0.1 * bs,
            p99_ms=0.2 * bs,
            throughput_ips=10000.0,
            accuracy=0.97,
            accuracy_delta_points=0.0,
        )  # fmt: skip
        for bs in sizes
    ]
    return Plan(
        model=str(model),
        files={str(model): sha256_of(model)},
        entries=entries,
        accuracy={"metric": "top1", "dataset": "digits", "images": 179, "reference": 0.97},
        search={"batch_sizes": list(sizes), "budget_seconds": 10.0},
        environment=environment(),
        created="2026-01-01T00:00:00+00:00",
    )


@pytest.fixture
def plan(tmp_path) -> Plan:
    return make_plan(tmp_path)


def test_write_read_round_trip_with_paths_relative_to_the_plan(plan, tmp_path):
    plan.write(tmp_path / "plan.json")
    raw = json.loads((tmp_path / "plan.json").read_text())
    assert list(raw)[0] == "format" and raw["format"] == FORMAT
    assert raw["model"] == "digits.onnx" and raw["entries"][0]["file"] == "digits.onnx"
    assert set(raw["entries"][0]) == set(PlanEntry.__dataclass_fields__)
    assert Plan.read(tmp_path / "plan.json") == plan
    # The folder moves as a whole: the plan still finds its model.
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved)
    again = Plan.read(moved / "plan.json")
    assert again.entries[0].file == str(moved / "digits.onnx")


def test_a_plan_is_written_only_where_it_holds_its_files(plan, tmp_path):
    """A file outside the plan's folder would need an absolute path or '..', which no
    plan may hold: writing it there is refused, and nothing is written."""
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match="^[^\n]*$") as e:
        plan.write(tmp_path / "sub" / "plan.json")
    assert "digits.onnx is outside" in str(e.value) and "inside its own folder" in str(e.value)
    assert not (tmp_path / "sub" / "plan.json").exists()


@pytest.mark.parametrize(
    "where, name, message",
    [
        ("entry", "/etc/digits.onnx", "plan.json: entry 1: file is '/etc/digits.onnx'"),
        ("entry", "../digits.onnx", "plan.json: entry 1: file is '../digits.onnx'"),
        ("entry", "a/../../digits.onnx", "entry 1: file is 'a/../../digits.onnx'"),
        ("entry", "..\\digits.onnx", "entry 1: file is '..\\\\digits.onnx'"),
        ("entry", "C:/digits.onnx", "entry 1: file is 'C:/digits.onnx'"),
        ("entry", "", "entry 1: file is ''"),
        ("files", "/tmp/digits.onnx", "plan.json: files is '/tmp/digits.onnx'"),
        ("model", "../digits.onnx", "plan.json: model is '../digits.onnx'"),
        ("candidate", "/x/digits.onnx", "plan.json: candidate 1: file is '/x/digits.onnx'"),
    ],
)
def test_a_plan_naming_a_file_outside_its_folder_is_refused(plan, tmp_path, where, name,
                                                            message):  # fmt: skip
    """A plan decides what runs (a .pt2 is code): it may only point inside its folder."""
    path = tmp_path / "plan.json"
    plan.write(path)
    data = json.loads(path.read_text())
    if where == "entry":
        data["entries"][0]["file"] = name
    elif where == "files":
        data["files"][name] = "0" * 64
    elif where == "model":
        data["model"] = name
    else:
        data["candidates"] = [{"file": name}]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="^[^\n]*$") as e:
        Plan.read(path)
    assert message in str(e.value)
    assert str(e.value).endswith("accepts only paths relative to its own folder, without '..' "
                                 "(make a new one with `convforge tune`)")  # fmt: skip


@pytest.mark.parametrize("asked, expected", [(1, 1), (2, 1), (4, 8), (16, 32), (100, 32)])
def test_entry_is_the_closest_batch_size_on_a_log_scale(tmp_path, asked, expected):
    plan = make_plan(tmp_path, sizes=(1, 8, 32))
    assert plan.entry(asked).batch_size == expected  # 16: a tie between 8 and 32 -> 32


def test_a_plan_from_another_machine_warns_with_what_differs(plan, monkeypatch):
    here = dict(plan.environment)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan.check_environment(here) == []
        # torch is not a library of this ort-cpu plan: its version does not matter.
        assert plan.check_environment({**here, "torch_version": "0.1"}) == []
    monkeypatch.setattr(
        "convforge.runtime.plan.environment", lambda: {**here, "cpu": "Other CPU 9000"}
    )
    with pytest.warns(PlanWarning, match=r"cpu: .* -> Other CPU 9000"):
        plan.check_environment()
    other = {**here, "onnxruntime_version": "0.0.1", "gpu": "NVIDIA H100"}
    with pytest.warns(PlanWarning, match=r"gpu: .* -> NVIDIA H100; onnxruntime: .* -> 0.0.1"):
        assert len(plan.check_environment(other)) == 2


def test_running_the_plan_warns_on_another_machine(plan, monkeypatch):
    monkeypatch.setattr(
        "convforge.runtime.plan.environment", lambda: {**plan.environment, "logical_cores": 96}
    )
    with pytest.warns(PlanWarning, match="logical_cores"), load_plan(plan, 1) as model:
        assert model.backend.name == "ort-cpu"


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "cannot read plan"),
        ("[]", 'is not a convforge plan (no "format": "convforge-plan/1")'),
        ('{"format": "other/2"}', "is not a convforge plan"),
        ("ENTRIES", "the plan has no entries"),
        ('ENTRY{"backend": "ort-gpu"}', "unknown backend 'ort-gpu'; choose one of: tensorrt"),
        ('ENTRY{"batch_size": "eight"}', "entry 1: batch_size takes an integer, got 'eight'"),
        ('ENTRY{"batch_size": 0}', "batch_size must be a positive integer, got 0"),
        ('ENTRY{"p50_ms": true}', "entry 1: p50_ms takes a number, got True"),
        ('ENTRY{"options": []}', "entry 1: options takes a mapping, got []"),
        ('ENTRY{"colour": "red"}', "unknown key PLAN: entry 1: colour; accepted: batch_size,"),
        ("NOBACKEND", "plan.json: entry 1: backend is missing"),
        ("NOMODEL", "plan.json: model is missing"),
        ("NOTOBJECT", "plan.json: entry 1 must be a mapping of keys to values, got list"),
    ],
)
def test_invalid_plan_files_are_one_line_errors(plan, tmp_path, content, message):
    path = tmp_path / "plan.json"
    plan.write(path)
    data = json.loads(path.read_text())
    if content == "ENTRIES":
        data["entries"] = []
    elif content.startswith("ENTRY"):
        data["entries"][0].update(json.loads(content.removeprefix("ENTRY")))
    elif content == "NOBACKEND":
        del data["entries"][0]["backend"]
    elif content == "NOMODEL":
        del data["model"]
    elif content == "NOTOBJECT":
        data["entries"][0] = [1, 2]
    else:
        data = None
    path.write_text(content if data is None else json.dumps(data))
    with pytest.raises(UserError, match="^[^\n]*$") as e:
        Plan.read(path)
    assert message.replace("PLAN", str(path)) in str(e.value)


def test_missing_or_unreadable_plan(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Plan.read(tmp_path / "none.json")
    with pytest.raises(UserError, match="cannot read plan"):
        Plan.read(tmp_path)  # a folder


def test_load_model_runs_exactly_the_planned_configuration(plan):
    with load_plan(plan, batch_size=6) as model:  # closest to 6: the batch-8 entry
        assert model.backend.name == "ort-cpu" and model.backend.threads == 1
        assert model.backend.threads_source == "option" and model.batch_size == 8
        assert model.predict([IMAGE], topk=1)[0][0].label == "4"


def test_runtime_load_takes_a_plan_for_its_own_model_only(plan, tmp_path):
    plan.write(tmp_path / "plan.json")
    with load(tmp_path / "digits.onnx", batch_size=1, plan=tmp_path / "plan.json") as model:
        assert model.backend.threads == 1 and model.batch_size == 1
    # The same content elsewhere is the same model.
    with load(FIXTURES / "digits.onnx", batch_size=1, plan=plan) as model:
        assert model.backend.name == "ort-cpu"
    other = tmp_path / "other.onnx"
    other.write_bytes((tmp_path / "digits.onnx").read_bytes() + b"\0")
    with pytest.raises(UserError, match="the plan was made for digits.onnx, not"):
        load(other, plan=plan)
    with pytest.raises(UserError, match="runs the plan's backend and options"):
        load(tmp_path / "digits.onnx", backend="openvino", plan=plan)


def test_a_changed_file_is_an_error_unless_forced_and_a_missing_one_always(plan, tmp_path):
    plan.files = {f: "0" * 64 for f in plan.files}  # as if tuned on other bytes
    with pytest.raises(UserError, match="^[^\n]*$") as e:
        load_plan(plan, 1)
    assert str(e.value) == (
        f"{plan.model} changed since it was tuned (sha256 differs): it is not what was "
        "tuned and checked; re-run `convforge tune`, or give --force-plan to run it anyway"
    )
    plan.files = {}  # no hash: nothing says what was tuned
    with pytest.raises(UserError, match="has no sha256 in the plan"):
        plan.check_file(plan.entries[0])
    plan.force = True  # --force-plan
    with pytest.warns(PlanWarning, match="running it as forced"), load_plan(plan, 1) as model:
        assert model.backend.name == "ort-cpu"
    assert "force" not in json.dumps(dataclasses.asdict(plan))  # never in the file
    Path(plan.model).unlink()
    with pytest.raises(UserError, match=r"the plan's file .*digits.onnx is missing"):
        load_plan(plan, 1)


def test_a_torch_entry_checks_the_pt2_program_it_runs(plan, tmp_path):
    """The torch backend runs the .pt2 beside the .onnx, and a .pt2 is code: the plan
    holds its hash too, and a swapped program does not run."""
    program = tmp_path / "digits.pt2"
    program.write_bytes(b"the program that was tuned")
    entry = dataclasses.replace(plan.entries[0], backend="torch", options={})
    plan.files[str(program)] = sha256_of(program)
    plan.check_file(entry)  # both as tuned
    program.write_bytes(b"another program")
    with pytest.raises(UserError, match=r"digits.pt2 changed since it was tuned"):
        plan.check_file(entry)
    del plan.files[str(program)]
    with pytest.raises(UserError, match=r"digits.pt2 has no sha256 in the plan"):
        plan.check_file(entry)


def test_bench_plan_times_each_entry_at_its_batch_size(plan):
    cfg = bench.BenchConfig(batch_sizes=(1, 7), warmup_iters=1, warmup_seconds=0,
                            iters=3, seconds=0)  # fmt: skip
    records = bench_plan(plan, cfg)
    assert [(r["batch_size"], r["plan_batch_size"]) for r in records] == [(1, 1), (7, 8)]
    assert all(r["backend"] == "ort-cpu" and r["threads"] == 1 for r in records)
    assert all(r["model"] == plan.model for r in records)
