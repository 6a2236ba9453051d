"""benchmarks/gpu_check.py without a GPU: the plan's order, the dry run, the JSON written
before and after every step (a run cut off keeps what it measured), the budget, the
batch-1 verdicts and the top-1 agreement. GPU work is replaced at the backend boundary."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _load_script():
    # benchmarks/ is not a package: the script is imported by path, once.
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


gc = _load_script()


def names(plan):
    return [s.name for s in plan]


def read(path):
    return json.loads(Path(path).read_text())


def state(seconds=1000.0, tmp_path=Path(".")):
    return gc.State(budget_end=time.perf_counter() + seconds, folder=tmp_path)


# -- the plan ----------------------------------------------------------------------------


def test_the_plan_runs_by_value():
    plan = gc.build_plan()
    order = names(plan)
    assert order[:3] == ["tests:runtime", "export", "reference"]
    assert order[-1] == "tests:other"  # the trainer's GPU test, last

    def first(predicate):
        return next(i for i, s in enumerate(plan) if predicate(s))

    backend = [s.describe.get("backend") for s in plan]
    compiled = [bool(s.describe.get("options", {}).get("compile")) for s in plan]
    assert (
        first(lambda s: s.describe.get("backend") == "tensorrt")
        < first(lambda s: s.describe.get("backend") == "ort-trt")
        < first(lambda s: s.describe.get("backend") == "ort-cuda")
        < first(lambda s: s.describe.get("backend") == "torch")
    )
    ort_cuda = [s.describe["options"] for s in plan if s.describe.get("backend") == "ort-cuda"]
    assert {"cuda_graph": True} in ort_cuda and {} in ort_cuda  # with and without graphs
    # one torch configuration before the compile ones, which come last of all the timings
    torch_steps = [i for i, b in enumerate(backend) if b == "torch"]
    assert not compiled[torch_steps[0]]
    assert all(compiled[i] for i in torch_steps[1:])
    assert max(i for i, b in enumerate(backend) if b and not compiled[i]) < torch_steps[1]
    assert all(s.needs == ("export",) for s in plan if s.describe)


def test_batch1_verdict_steps_build_engines_for_batch1():
    for step in gc.build_plan():
        d = step.describe
        if d.get("backend") in ("tensorrt", "ort-trt"):
            (batch,) = d["batches"]  # one engine per batch size judged
            assert d["options"] == {"min_batch": batch, "opt_batch": batch, "max_batch": batch}


def test_only_selects_steps_with_what_they_need_in_plan_order():
    plan = gc.select(gc.build_plan(), ["ort-cuda fp16*"])
    assert names(plan) == ["export", "reference", "ort-cuda fp16", "ort-cuda fp16 cuda-graph"]
    assert names(gc.select(gc.build_plan(), ["tests:*"])) == ["tests:runtime", "tests:other"]


# -- the JSON, step by step --------------------------------------------------------------


def snapshots_of_every_write(monkeypatch):
    """The JSON file's content after each write_json."""
    taken = []
    write = gc.write_json

    def recording(path, result):
        write(path, result)
        taken.append(read(path))

    monkeypatch.setattr(gc, "write_json", recording)
    return taken


def test_dry_run_lists_the_steps_and_writes_the_skeleton_after_each(monkeypatch, tmp_path, capsys):
    def no_gpu_work(*args, **kwargs):
        raise AssertionError("a dry run runs no step")

    for name in ("_export", "_reference", "bench_step"):
        monkeypatch.setattr(gc, name, no_gpu_work)
    monkeypatch.setattr(gc, "_tests", lambda *a, **k: no_gpu_work)
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch now fails
    taken = snapshots_of_every_write(monkeypatch)
    out = tmp_path / "results" / "gpu_check.json"

    assert gc.main(["--dry-run", "--out", str(out)]) == 0

    plan = names(gc.build_plan())
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(". ", 1)[1].rsplit(" (~", 1)[0] for line in printed[: len(plan)]] == plan
    assert len(taken) == 1 + len(plan)  # the skeleton, then once after every step
    for k, snapshot in enumerate(taken):
        assert snapshot["plan"] == plan and snapshot["dry_run"] is True
        statuses = [e["status"] for e in snapshot["steps"]]
        assert statuses == ["dry-run"] * k + ["pending"] * (len(plan) - k)
    assert read(out) == taken[-1]
    assert list(tmp_path.joinpath("results").iterdir()) == [out]  # no temp file left


def test_a_step_cut_off_leaves_the_earlier_results_on_disk(tmp_path):
    out = tmp_path / "gpu_check.json"
    seen_while_running = {}

    def measured(state):
        state.records.append({"batch_size": 1, "timing": "compute-only", "p50_ms": 0.5,
                              "throughput_ips": 2000.0, "backend": "tensorrt",
                              "options": {"opt_batch": 1}, "file": "fp16"})  # fmt: skip
        return {"measured": 1}

    def broken(state):
        raise ValueError("engine build failed\nsecond line")

    def killed(state):
        seen_while_running.update(read(out))  # what a SIGKILL now would leave on disk
        raise KeyboardInterrupt  # SIGTERM: main turns it into SystemExit

    plan = [
        gc.Step("a", 1, measured),
        gc.Step("b", 1, broken),
        gc.Step("c", 1, killed),
        gc.Step("d", 1, measured),
    ]
    result = {}
    with pytest.raises(KeyboardInterrupt):
        gc.run_plan(plan, state(tmp_path=tmp_path), result, out, dry_run=False)

    running = {e["name"]: e["status"] for e in seen_while_running["steps"]}
    assert running == {"a": "done", "b": "failed", "c": "running", "d": "pending"}
    assert seen_while_running["records"][0]["p50_ms"] == 0.5
    on_disk = read(out)
    steps = {e["name"]: e for e in on_disk["steps"]}
    assert steps["a"]["status"] == "done" and steps["a"]["measured"] == 1
    assert steps["b"]["why"] == "ValueError: engine build failed"
    assert steps["c"]["status"] == "cut off"
    assert steps["d"]["status"] == "pending"
    assert on_disk["verdicts"]["batch1_p50_ms"]["value"] == 0.5


def test_steps_that_do_not_fit_or_lack_their_inputs_are_skipped_with_the_reason(tmp_path):
    def fails(state):
        raise RuntimeError("export needs torch")

    plan = [
        gc.Step("export", 1, fails),
        gc.Step("bench", 1, lambda s: {}, needs=("export",)),
        gc.Step("long", 60, lambda s: {}),
        gc.Step("short", 1, lambda s: {"ran": True}),
    ]
    result = gc.run_plan(plan, state(10, tmp_path), {}, tmp_path / "r.json", dry_run=False)
    steps = {e["name"]: e for e in result["steps"]}
    assert steps["bench"] == {
        "name": "bench", "status": "skipped", "why": "needs export, which did not run"
    }  # fmt: skip
    assert steps["long"]["status"] == "skipped"
    assert steps["long"]["why"].startswith("over the time budget (")
    assert steps["short"]["ran"] is True


# -- one timing step, with the backend replaced ------------------------------------------


class FakeBackend:
    """A loaded backend: logits = the input's per-image mean in class 0 (+ a fixed
    pattern), float32 and float16 inputs, one batch size when ``single``."""

    device_resident = False
    made = []

    def __init__(self, path, **options):
        self.options = options
        self.single_batch_size = bool(options.get("cuda_graph"))
        self.spec = None
        self.runs = []
        FakeBackend.made.append(self)

    @classmethod
    def available(cls):
        return True, ""

    def load(self):
        from convforge.contract import InputSpec

        self.spec = InputSpec(channels=3, height=8, width=8)
        return self

    input_dtypes = (np.float32, np.float16)

    def run(self, batch):
        self.runs.append((len(batch), batch.dtype))
        logits = np.tile(np.arange(10, dtype=np.float32), (len(batch), 1))
        logits[:, 0] = batch.reshape(len(batch), -1).mean(axis=1) * 1000
        return logits

    def describe(self):
        return {"backend": "fake", "precision": "fp16"}

    def close(self):
        pass


@pytest.fixture
def fake_backends(monkeypatch):
    from convforge.runtime import backends, bench

    FakeBackend.made = []
    monkeypatch.setattr(backends, "backend_class", lambda name: FakeBackend)
    monkeypatch.setattr(backends, "create", lambda name, path, **o: FakeBackend(path, **o))
    monkeypatch.setattr(bench, "timed", lambda fn, cfg: [fn() is None or 1.0 for _ in range(3)])
    return FakeBackend


def reference_state(tmp_path, n=8):
    s = state(tmp_path=tmp_path)
    s.files = {"fp32": tmp_path / "m.onnx", "fp16": tmp_path / "m.fp16.onnx"}
    s.inputs = np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32)
    s.reference = FakeBackend("").run(s.inputs)
    FakeBackend.made.clear()  # count the step's instances only
    return s


def test_fp16_host_inputs_are_timed_on_the_same_instance_never_for_compiled(
    fake_backends, tmp_path
):
    s = reference_state(tmp_path)
    plain = gc._torch(cuda_graphs=True)
    out = gc.bench_step(s, "torch", "fp32", plain, (1, 4))
    timings = [r["timing"] for r in s.records]
    assert timings.count("end-to-end, fp16 host input") == 2  # batch 1 and 4
    assert len(fake_backends.made) == 1  # no reload for it
    assert out["agreement"] == {"inputs": 8, "top1": 1.0, "max_abs_diff": 0.0}

    s.records.clear()
    gc.bench_step(s, "torch", "fp32", gc._torch(compile=True), (1, 4))
    assert "end-to-end, fp16 host input" not in [r["timing"] for r in s.records]


def test_single_batch_instances_check_agreement_at_their_own_size(fake_backends, tmp_path):
    s = reference_state(tmp_path, n=8)
    out = gc.bench_step(s, "ort-cuda", "fp16", {"cuda_graph": True}, (1, 4))
    first, second = fake_backends.made  # one instance per batch size
    assert {n for n, _ in first.runs} == {1}  # the batch-1 graph ran the inputs one by one
    assert {n for n, _ in second.runs} == {4}
    assert out["agreement"]["inputs"] == 8
    assert {r["options"]["cuda_graph"] for r in s.records} == {True}


def test_an_instance_that_fails_keeps_the_records_before_it(fake_backends, monkeypatch, tmp_path):
    s = reference_state(tmp_path)
    load = FakeBackend.load

    def second_fails(self):
        if len(FakeBackend.made) > 1:
            raise RuntimeError("out of memory building the batch-4 engine")
        return load(self)

    monkeypatch.setattr(FakeBackend, "load", second_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        gc.bench_step(s, "ort-cuda", "fp16", {"cuda_graph": True}, (1, 4))
    assert {r["batch_size"] for r in s.records} == {1}  # the batch-1 timings are kept


# -- verdicts and agreement --------------------------------------------------------------


def record(batch, timing, p50, ips, **options):
    return {"batch_size": batch, "timing": timing, "p50_ms": p50, "throughput_ips": ips,
            "backend": "tensorrt", "options": options, "file": "fp16"}  # fmt: skip


def test_verdicts_judge_each_batch_on_an_engine_built_for_it():
    records = [
        record(1, "compute-only", 0.40, 2500, opt_batch=256),  # tuned for 256: not counted
        record(1, "compute-only", 0.55, 1800, opt_batch=1),
        record(1, "end-to-end", 0.30, 3300, opt_batch=1),  # end to end: not the goal's
        record(256, "compute-only", 14.0, 18000, opt_batch=256),
        record(256, "compute-only", 12.0, 21000, opt_batch=1),  # not counted
        record(256, "compute-only", 16.0, 16000),  # no profile (torch): counted
    ]
    v = gc.verdicts(records)
    assert v["batch1_p50_ms"]["value"] == 0.55 and v["batch1_met"] is True
    assert v["batch256_images_per_s"]["value"] == 18000 and v["batch256_met"] is True
    assert gc.verdicts([])["batch1_met"] is False


def test_agreement_counts_matching_top1_classes():
    reference = np.eye(4, dtype=np.float32)
    logits = reference.copy()
    logits[3] = [0, 0, 2, 1]  # the last input's top-1 differs
    assert gc.agreement_of(reference, logits) == {"inputs": 4, "top1": 0.75, "max_abs_diff": 2.0}
