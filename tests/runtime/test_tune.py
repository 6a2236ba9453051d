"""The tune search on the digits fixture: candidates, the accuracy budget (a real,
deliberately broken copy of the model is rejected), the choice, pruning and budgets.
No assertion reads a timing: only what the search decided from its measurements."""

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from convforge import contract
from convforge.errors import UserError
from convforge.runtime import backends, evaluate, load
from convforge.runtime.backends.options import parse_options
from convforge.runtime.backends.ort import OrtCpu
from convforge.runtime.backends.ort_cuda import OrtCuda
from convforge.runtime.backends.ort_trt import OrtTensorRT
from convforge.runtime.backends.tensorrt import TensorRT
from convforge.runtime.backends.torch_program import TorchProgram
from convforge.runtime.candidates import Candidate, candidates
from convforge.runtime.plan import Plan
from convforge.runtime.tune import TuneConfig, _prune, _Timed, tune

FIXTURES = Path(__file__).parents[1] / "fixtures"
QUICK = dict(budget_seconds=4.0, rounds=2, iters=5)  # seconds per test, not minutes


@pytest.fixture(scope="module")
def labelled():
    """The digits validation split as raw images and labels (what tune --dataset loads)."""
    from convforge.cli.runtime import _labelled_images

    return _labelled_images("digits", str(FIXTURES / "digits.onnx"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(the fp32 digits model, a copy whose weights carry noise: a real, worse model)."""
    folder = tmp_path_factory.mktemp("tune")
    good = folder / "digits.onnx"
    shutil.copyfile(FIXTURES / "digits.onnx", good)
    model = onnx.load(str(good))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim > 1:  # conv and linear weights
            noisy = w + rng.normal(0, 0.8 * w.std(), w.shape).astype(w.dtype)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    broken = folder / "digits.noisy.onnx"
    onnx.save(model, str(broken))
    return good, broken


def _top1(path, images, labels) -> float:
    """The oracle: top-1 through the Model API, independent of tune's own code."""
    with load(str(path), backend="ort-cpu") as model:
        return evaluate.accuracy(model, images, labels)


def test_cpu_candidates_are_each_backends_settings_that_matter(models, monkeypatch):
    good, _ = models
    monkeypatch.setattr("convforge.runtime.backends.ort.physical_cores", lambda: (4, "test"))
    monkeypatch.setattr("convforge.runtime.backends.openvino.native_bf16", lambda: False)
    pool, skipped = candidates([str(good)], (1, 8), ["ort-cpu", "openvino"])
    ort = {c.options for c in pool if c.backend == "ort-cpu" and c.batch_size == 1}
    assert ort == {
        (("graph_optimization", "all"),),
        (("graph_optimization", "all"), ("threads", 1)),
        (("graph_optimization", "basic"),),
        (("graph_optimization", "basic"), ("threads", 1)),
    }
    if backends.backend_class("openvino").available()[0]:
        ov = {c.options for c in pool if c.backend == "openvino" and c.batch_size == 8}
        assert ov == {(("hint", h), ("precision", "f32")) for h in ("LATENCY", "THROUGHPUT")}
    # Threads never change results: one accuracy check covers both thread counts.
    keys = {c.accuracy_key for c in pool if c.backend == "ort-cpu"}
    assert keys == {("ort-cpu", str(good), (("graph_optimization", g),)) for g in ("all", "basic")}


def test_gpu_candidates_come_from_the_same_table_when_available(models, tmp_path, monkeypatch):
    good, _ = models
    fp16 = tmp_path / "digits.fp16.onnx"  # metadata says fp16: enough to generate candidates
    model = onnx.load(str(good))
    contract.write_props(model, contract.encode({"precision": "fp16"}))
    onnx.save(model, str(fp16))
    for cls in (OrtCuda, OrtTensorRT, TensorRT):
        monkeypatch.setattr(cls, "available", classmethod(lambda cls: (True, "")))
    monkeypatch.setattr(
        TorchProgram, "available", classmethod(lambda cls, device="cpu": (True, ""))
    )
    monkeypatch.setattr("convforge.runtime.backends.torch_program.native_bf16", lambda: False)
    names = ["ort-cuda", "ort-trt", "tensorrt", "torch"]
    pool, skipped = candidates([str(good), str(fp16)], (1, 8), names)
    # The .pt2 program is fp32 only: the torch backend has nothing to run for an fp16 file.
    assert skipped == ["torch on digits.fp16.onnx (runs fp32 files; this is fp16)"]

    def opts(backend, path, bs):
        return [c.opts for c in pool if (c.backend, c.file, c.batch_size) == (backend, path, bs)]

    assert opts("ort-cuda", str(fp16), 8) == [{"cuda_graph": False}, {"cuda_graph": True}]
    profile = {"min_batch": 1, "opt_batch": 1, "max_batch": 8}
    assert opts("tensorrt", str(good), 1) == [{**profile, "tf32": False}, {**profile, "tf32": True}]
    assert opts("tensorrt", str(fp16), 8) == [{**profile, "opt_batch": 8, "tf32": False}]
    assert opts("ort-trt", str(fp16), 1) == [profile]
    cuda = [o for o in opts("torch", str(good), 1) if o.get("device") == "cuda"]
    assert {(o["dtype"], o["cuda_graphs"]) for o in cuda} == {
        ("fp32", False), ("fp32", True), ("fp16", False), ("fp16", True)
    }  # fmt: skip
    assert opts("torch", str(fp16), 1) == []
    for c in pool:  # every option set is one its backend accepts
        parse_options(backends.backend_class(c.backend).Options, c.opts, c.backend)
    # CUDA graphs do not change numerics; fp16 does.
    keys = {c.accuracy_key for c in pool if c.backend == "torch" and c.file == str(good)}
    assert len(keys) == 3  # cpu; cuda fp32; cuda fp16


@pytest.mark.parametrize("native", [True, False])
def test_bf16_is_a_candidate_where_the_cpu_computes_it_natively(models, tmp_path, monkeypatch,
                                                                native):  # fmt: skip
    """bf16 is tried (each with its own accuracy check) on CPUs with native bf16 only;
    never on an fp16 file (the same bf16 compute from coarser weights)."""
    good, _ = models
    fp16 = tmp_path / "digits.fp16.onnx"
    model = onnx.load(str(good))
    contract.write_props(model, contract.encode({"precision": "fp16"}))
    onnx.save(model, str(fp16))
    for module in ("openvino", "torch_program"):
        monkeypatch.setattr(f"convforge.runtime.backends.{module}.native_bf16", lambda: native)
    for cls in (backends.backend_class("openvino"), TorchProgram):
        monkeypatch.setattr(cls, "available", classmethod(lambda c, device="cpu": (
            device == "cpu", "")))  # fmt: skip
    pool, _ = candidates([str(good), str(fp16)], (1,), ["openvino", "torch"])

    def precisions(backend, path, key):
        return {c.opts.get(key) for c in pool if (c.backend, c.file) == (backend, str(path))}

    assert precisions("openvino", good, "precision") == ({"f32", "bf16"} if native else {"f32"})
    assert precisions("openvino", fp16, "precision") == {"f32"}
    assert precisions("torch", good, "dtype") == ({None, "bf16"} if native else {None})
    keys = {c.accuracy_key for c in pool if c.backend == "openvino" and c.file == str(good)}
    assert len(keys) == (2 if native else 1)  # hints share a check; precisions do not


def test_tune_checks_bf16_and_the_plan_names_the_precision_that_ran(models, labelled,
                                                                    monkeypatch):  # fmt: skip
    from convforge.runtime.backends import openvino

    if not openvino.OpenVino.available()[0]:
        pytest.skip("openvino is not installed")
    native = openvino.native_bf16()
    monkeypatch.setattr(openvino, "native_bf16", lambda: True)  # a candidate on every CPU
    good, _ = models
    cfg = TuneConfig(batch_sizes=(2,), max_drop=100.0, **QUICK)
    plan = tune([good], labelled[0][:40], labelled[1][:40], cfg, names=["openvino"])
    ran = {r["options"]["precision"]: r["precision"] for r in plan.candidates}
    # Without native bf16 OpenVINO runs the bf16 request in f32, and the record says so.
    assert ran == {"f32": "fp32", "bf16": "bf16" if native else "fp32"}
    assert all(r["settings"]["requested_precision"] == r["options"]["precision"]
               for r in plan.candidates if r["settings"])  # fmt: skip
    (entry,) = plan.entries
    assert entry.precision == ran[entry.options["precision"]]


def test_the_plan_hashes_every_file_a_candidate_reads(labelled, tmp_path):
    """The torch backend runs the .pt2 beside the .onnx: the plan records its hash too,
    taken before anything ran, so that a swapped program is refused later."""
    if not TorchProgram.available()[0]:
        pytest.skip("torch is not installed")
    model = Path(shutil.copy(FIXTURES / "digits.onnx", tmp_path / "digits.onnx"))
    program = tmp_path / "digits.pt2"
    program.write_bytes(b"not a torch.export program")  # the torch candidates fail on it
    cfg = TuneConfig(batch_sizes=(1,), **QUICK)
    plan = tune([model], labelled[0][:20], labelled[1][:20], cfg, names=["ort-cpu", "torch"])
    assert plan.files == {str(model): contract.sha256_of(model),
                          str(program): contract.sha256_of(program)}  # fmt: skip
    assert {r["status"] for r in plan.candidates if r["backend"] == "torch"} == {"failed"}


def test_an_unavailable_backend_is_skipped_with_its_reason_never_replaced(models, monkeypatch):
    good, _ = models
    monkeypatch.setattr(OrtCuda, "available", classmethod(lambda cls: (False, "no GPU here")))
    pool, skipped = candidates([str(good)], (1,), ["ort-cuda", "ort-cpu"])
    assert skipped == ["ort-cuda (no GPU here)"]
    assert {c.backend for c in pool} == {"ort-cpu"}
    with pytest.raises(UserError, match="unknown backend 'nope'"):
        candidates([str(good)], (1,), ["nope"])


def test_tune_keeps_the_accuracy_budget_and_chooses_the_fastest(models, labelled):
    good, broken = models
    images, labels = labelled
    cfg = TuneConfig(batch_sizes=(4, 1, 4), **QUICK)  # planned once each, ascending
    plan = tune([good, broken, good], images, labels, cfg, names=["ort-cpu"], dataset="digits")
    assert list(plan.files) == [str(good), str(broken)]
    reference = _top1(good, images, labels)
    noisy = _top1(broken, images, labels)
    assert reference - noisy > 0.05  # the noise really hurts (a check of the fixture)
    assert plan.model == str(good) and plan.accuracy["reference"] == pytest.approx(reference)
    assert plan.accuracy["metric"] == "top1" and plan.accuracy["images"] == len(images)
    rejected = [r for r in plan.candidates if r["file"] == str(broken)]
    assert rejected and all(r["status"] == "rejected" for r in rejected)
    assert rejected[0]["accuracy"] == pytest.approx(noisy)
    assert rejected[0]["accuracy_delta_points"] == pytest.approx((noisy - reference) * 100)
    assert [e.batch_size for e in plan.entries] == [1, 4]
    for entry in plan.entries:
        assert entry.file == str(good) and entry.backend == "ort-cpu"
        assert entry.accuracy_delta_points >= -0.5 and entry.settings["backend"] == "ort-cpu"
        assert entry.throughput_ips == pytest.approx(entry.batch_size * 1000 / entry.p50_ms)
        timed = [
            r
            for r in plan.candidates
            if r["batch_size"] == entry.batch_size and r["status"] in ("chosen", "measured")
        ]
        assert entry.p50_ms == min(r["p50_ms"] for r in timed)
        assert entry.p99_ms >= entry.p50_ms
    plan.write(good.parent / "plan.json")  # beside its models: a plan names no other files
    assert Plan.read(good.parent / "plan.json") == plan


def test_without_labels_tune_measures_agreement_with_the_fp32_file(models, labelled):
    good, broken = models
    images = labelled[0][:40]
    cfg = TuneConfig(batch_sizes=(2,), max_drop=100.0, **QUICK)
    plan = tune([good, broken], images, None, cfg, names=["ort-cpu"])
    assert plan.model == str(good)  # the first fp32 file given is the reference
    assert plan.accuracy == {**plan.accuracy, "metric": "agreement", "reference": 1.0}
    own = [r for r in plan.candidates if r["file"] == str(good)]
    assert all(r["accuracy"] == 1.0 for r in own if r["options"]["graph_optimization"] == "all")
    with backends.create("ort-cpu", str(good)) as a, backends.create("ort-cpu", str(broken)) as b:
        from convforge.runtime.preprocess import preprocess

        x = preprocess(images, contract.read_info(good))
        agree = float(np.mean(a.run(x).argmax(1) == b.run(x).argmax(1)))
    noisy = next(r for r in plan.candidates if r["file"] == str(broken))
    assert noisy["accuracy"] == pytest.approx(agree) and noisy["status"] != "rejected"


def test_a_tiny_budget_still_measures_one_round_and_halves_the_field(models, labelled):
    good, _ = models
    cfg = TuneConfig(batch_sizes=(1,), budget_seconds=0.001, rounds=3, iters=5)
    plan = tune([good], labelled[0][:20], labelled[1][:20], cfg, names=["ort-cpu"])
    timed = [r for r in plan.candidates if r["p50_ms"] is not None]
    assert len(timed) >= 2 and all(r["rounds"] == 1 for r in timed)
    assert [r["status"] for r in timed].count("chosen") == 1
    others = [r for r in timed if r["status"] != "chosen"]
    assert all(r["status"] == "pruned" for r in others)
    assert all("budget" in r["why"] or "x the best" in r["why"] for r in others)


def test_prune_drops_slow_candidates_after_round_one_and_halves_to_fit(models):
    good, _ = models

    def timed(ms):
        record = {"status": "measured", "why": ""}
        return _Timed(record, OrtCpu(str(good)), np.zeros(1), rounds=[[ms, ms, ms]])

    field = [timed(1.0), timed(1.5), timed(5.0)]
    cfg = TuneConfig(rounds=5, prune_ratio=2.0)
    kept = _prune(field, done=1, left=100.0, cfg=cfg)
    assert kept == field[:2]
    assert field[2].record == {"status": "pruned", "why": "pruned after round 1: 5.0x the best p50"}
    # 4 more rounds of 3 runs each of 1 ms + 1.5 ms need 30 ms: with 20 ms left, halve.
    kept = _prune(field[:2], done=1, left=0.020, cfg=cfg)
    assert kept == field[:1] and "to fit the budget" in field[1].record["why"]


def test_tune_refuses_before_measuring(models, labelled, tmp_path):
    good, _ = models
    fp16 = tmp_path / "only.fp16.onnx"
    model = onnx.load(str(good))
    contract.write_props(model, contract.encode({"precision": "fp16"}))
    onnx.save(model, str(fp16))
    with pytest.raises(UserError, match="needs the fp32 file among its files"):
        tune([fp16], labelled[0], labelled[1], TuneConfig(**QUICK))
    with pytest.raises(UserError, match="does not exist"):
        tune([tmp_path / "none.onnx"], labelled[0], labelled[1])
    with pytest.raises(UserError, match="--batch-sizes entry must be a positive integer, got 0"):
        tune([good], labelled[0], labelled[1], TuneConfig(batch_sizes=(0,)))
    with pytest.raises(UserError, match="at least one image"):
        tune([good], [], None)


SUMMARY = {"speedup": 2.0, "macs": 100, "params": 10, "top1": 0.9,
           "original": {"macs": 200, "params": 20, "top1": 0.91}}  # fmt: skip


def _compressed_copy(source, target, source_sha256=None):
    """``source`` as an export of a compressed checkpoint says it is one (the ``compressed``
    key; by default compressed from the checkpoint ``source`` was exported from)."""
    model = onnx.load(str(source))
    own = contract.read_info(source).metadata["source_sha256"]
    summary = {**SUMMARY, "source_sha256": source_sha256 or own}
    contract.write_props(model, contract.encode({"compressed": summary}))
    onnx.save(model, str(target))
    return target


def test_compressed_files_are_candidates_judged_against_the_original(models, labelled, tmp_path):
    good, broken = models
    original = Path(shutil.copy(good, tmp_path / "digits.onnx"))
    small = _compressed_copy(good, tmp_path / "small.onnx")
    lossy = _compressed_copy(broken, tmp_path / "small.noisy.onnx")
    images, labels = labelled
    cfg = TuneConfig(batch_sizes=(1,), **QUICK)
    # Compressed files first: the reference is still the original, wherever it is listed.
    plan = tune([small, lossy, original], images, labels, cfg, names=["ort-cpu"])
    assert plan.model == str(original) and list(plan.files)[0] == str(original)
    assert plan.accuracy["reference"] == pytest.approx(_top1(original, images, labels))
    for r in plan.candidates:
        named = {"speedup": 2.0, "macs": 100, "params": 10, "from_reference": True}
        assert r["compressed"] == (None if r["file"] == str(original) else named)
    # The one that lost accuracy is rejected against the original's top-1; the one that
    # did not is an ordinary candidate.
    assert {r["status"] for r in plan.candidates if r["file"] == str(lossy)} == {"rejected"}
    own = [r for r in plan.candidates if r["file"] == str(small)]
    assert own and all(r["accuracy_delta_points"] == 0 and r["status"] != "rejected"
                       for r in own if r["options"]["graph_optimization"] == "all")  # fmt: skip
    plan.write(tmp_path / "plan.json")
    assert Plan.read(tmp_path / "plan.json").candidates == plan.candidates


def test_tune_needs_the_original_when_every_fp32_file_is_compressed(models, labelled, tmp_path):
    good, _ = models
    small = _compressed_copy(good, tmp_path / "small.onnx")
    said = r"^tune needs the original fp32 file as the accuracy reference, and every fp32 "
    with pytest.raises(UserError, match=said + r"file given is compressed \(small.onnx\)"):
        tune([small], labelled[0], labelled[1], TuneConfig(**QUICK))


def test_a_compressed_file_says_whether_it_came_from_the_reference(models, tmp_path):
    from convforge.runtime.tune import _compressed

    good, _ = models
    ours = _compressed_copy(good, tmp_path / "ours.onnx")
    other = _compressed_copy(good, tmp_path / "other.onnx", source_sha256="0" * 64)
    reference = contract.read_info(good)
    assert _compressed(contract.read_info(ours), reference)["from_reference"] is True
    assert _compressed(contract.read_info(other), reference)["from_reference"] is False
    assert _compressed(reference, reference) is None


def test_candidate_labels_and_keys_are_stable():
    c = Candidate("ort-cpu", "/m/x.onnx", 8, (("graph_optimization", "all"), ("threads", 1)))
    assert c.label == "ort-cpu x.onnx graph_optimization=all threads=1"
    assert c.accuracy_key == ("ort-cpu", "/m/x.onnx", (("graph_optimization", "all"),))


def test_each_turn_opens_with_an_untimed_run(models):
    """The run after another engine's turn is not timed: it pays for the neighbour's
    spinning threads. Every other run of the turn is."""
    from convforge.runtime.tune import _timed_round

    with OrtCpu(str(models[0])) as backend:
        x = np.zeros(backend.spec.shape(2), np.float32)
        calls = []
        run = backend.run
        backend.run = lambda batch: calls.append(batch) or run(batch)
        samples = _timed_round(backend, x, slot=0.0, iters=10)
    assert len(calls) == len(samples) + 1 and len(samples) == 3  # MIN_ITERS when out of time
