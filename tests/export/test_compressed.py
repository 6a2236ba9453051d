"""Exporting a compressed checkpoint (one `convforge compress` wrote): every file carries the
``compressed`` metadata key, and the report compares the model with the original.

The checkpoints are made by hand, as compress leaves them (an original; a copy with some
layers narrowed, recorded in ``model_config.widths``, plus a ``compress`` record), so these
tests need no pruning library and no training."""

import dataclasses
import json

import pytest
import torch

from convforge import contract
from convforge.builder.checkpoint import load_checkpoint, save_checkpoint
from convforge.builder.complexity import measure
from convforge.builder.registry import ModelConfig, build_model
from convforge.builder.widths import apply_widths, changed_widths
from convforge.cli import main
from convforge.export import compressed_report, latency
from convforge.export.exporter import ExportOptions, export_checkpoint
from tests.helpers import with_bn_statistics

CONFIG = ModelConfig("resnet18", num_classes=10, in_channels=1, stem="small",
                     options={"base_width": 8})  # fmt: skip
DATA = {"dataset": "digits", "classes": [str(i) for i in range(10)], "mean": [0.3], "std": [0.37],
        "input_size": 16, "resize_size": 16, "channels": 1, "native_size": 8}  # fmt: skip
NARROWER = {"layer1.0.conv1": [4, 8], "layer1.0.bn1": [4], "layer1.0.conv2": [8, 4],
            "layer2.1.conv1": [8, 16], "layer2.1.bn1": [8], "layer2.1.conv2": [16, 8]}  # fmt: skip


def _sharp(model: torch.nn.Module) -> torch.nn.Module:
    """Real BN statistics, and logits spread far apart, so that fp16 and int8 agree with fp32
    on the top class as trained weights do (untrained ones give near-ties)."""
    model = with_bn_statistics(model)
    with torch.no_grad():
        model.fc.weight.mul_(20)
    return model


def _save(path, cfg: ModelConfig, model, **extra):
    save_checkpoint(path, {"model_state": model.state_dict(), "model_config":
                           dataclasses.asdict(cfg), "data_config": DATA, "epoch": 1,
                           "train_config": {"val_fraction": 0.1, "seed": 0}, **extra})  # fmt: skip
    return path


def _record(source, cfg: ModelConfig) -> dict:
    """A compress record for ``cfg``'s model made from the checkpoint ``source``, with the
    MACs and parameters counted as compress counts them."""
    big, small = measure(CONFIG, 16), measure(cfg, 16)
    return {
        "source": str(source), "source_sha256": contract.sha256_of(source),
        "target": {"speedup": 1.2}, "max_drop": 0.5, "importance": "l2", "steps": 1,
        "epochs": 1, "distill_weight": 0.5, "dataset": "digits",
        "original": {"macs": big.macs, "params": big.params, "top1": 0.9},
        "rounds": [], "kept": 1, "macs": small.macs, "params": small.params,
        "speedup": round(big.macs / small.macs, 3), "top1": 0.885,
    }  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(the original checkpoint, the compressed one, its record)."""
    folder = tmp_path_factory.mktemp("compressed")
    torch.manual_seed(0)
    original = _save(folder / "original.pt", CONFIG, _sharp(build_model(CONFIG)))
    narrowed = apply_widths(build_model(CONFIG), NARROWER)
    cfg = dataclasses.replace(CONFIG, widths=changed_widths(narrowed, build_model(CONFIG)))
    assert cfg.widths == NARROWER
    record = _record(original, cfg)
    small = _save(folder / "small.pt", cfg, _sharp(build_model(cfg)), compress=record)
    return original, small, record


@pytest.fixture
def probe(monkeypatch):
    """latency_probe replaced by one that says 2 ms for the original's size and 1 ms for any
    smaller model, and records what it was asked for."""
    calls = []
    full = sum(p.numel() for p in build_model(CONFIG).parameters())

    def fake(backend, input_size):
        calls.append((backend, input_size))
        return lambda model: 2.0 if sum(p.numel() for p in model.parameters()) == full else 1.0

    monkeypatch.setattr(latency, "latency_probe", fake)
    return calls


def _summary(record: dict) -> dict:
    keys = ("source_sha256", "speedup", "macs", "params", "top1")
    original = {k: record["original"][k] for k in ("macs", "params", "top1")}
    return {**{k: record[k] for k in keys}, "original": original}


@pytest.mark.slow
def test_every_file_of_a_compressed_export_says_so(made, probe, tmp_path):
    original, small, record = made
    out = tmp_path / "small.onnx"
    opts = ExportOptions(fp16=True, int8=True, int8_max_drop=100.0, calib_samples=32,
                         val_samples=64, input_format="uint8",
                         triton_repo=str(tmp_path / "repo"))  # fmt: skip
    report = export_checkpoint(small, out, opts)
    assert report.validation.passed and all(v["report"].passed for v in report.variants.values())
    files = [out, *(v["path"] for v in report.variants.values()), out.with_suffix(".pt2"),
             tmp_path / "repo" / "small" / "1" / "model.onnx"]  # fmt: skip
    assert len(files) == 8  # fp32, fp16, int8, their three uint8 twins, .pt2, Triton's copy
    for f in files:
        assert contract.read_info(f).compressed == _summary(record), f
    # The rounds and options stay in the checkpoint; the files carry the summary only.
    assert "rounds" not in contract.read_info(out).metadata["compressed"]
    assert contract.read_info(out).arch == "resnet18"  # otherwise an ordinary export


def test_the_report_compares_with_the_original(made, probe, tmp_path):
    original, small, record = made
    out = tmp_path / "small.onnx"
    report = export_checkpoint(small, out, ExportOptions(val_samples=32))
    section = report.compressed
    assert probe == [("ort-cpu", (1, 16, 16))]  # one probe, for both models, as specified
    assert section["original_checkpoint"] == str(original) and section["original_missing"] is None
    macs = record["original"]["macs"], record["macs"]
    assert section["macs"] == {"original": macs[0], "compressed": macs[1],
                               "ratio": round(macs[0] / macs[1], 3)}  # fmt: skip
    assert section["params"]["compressed"] == record["params"] < section["params"]["original"]
    assert section["top1"] == {"original": 0.9, "compressed": 0.885, "delta_points": -1.5}
    assert section["latency_ms"] == {"backend": "ort-cpu", "batch_size": 1, "original": 2.0,
                                     "compressed": 1.0, "speedup": 2.0}  # fmt: skip
    saved = json.loads(out.with_suffix(".export.json").read_text())
    assert saved["compressed"] == section
    text = report.format()
    assert f"compressed from {original} (original -> compressed):" in text
    assert "top-1    90.00% -> 88.50% (-1.50 points" in text
    assert "latency  2.000 ms -> 1.000 ms (2.00x faster, batch 1 on ort-cpu)" in text


def test_an_ordinary_checkpoint_has_no_compressed_section_or_key(made, probe, tmp_path):
    original, _, _ = made
    report = export_checkpoint(original, tmp_path / "m.onnx", ExportOptions(val_samples=32))
    assert report.compressed is None and probe == []
    assert contract.read_info(tmp_path / "m.onnx").compressed is None
    assert "compressed" not in report.format()


def test_the_original_is_found_beside_the_checkpoint(made, tmp_path, monkeypatch):
    original, small, _ = made
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recorded path is absolute; try a relative one too
    ck = load_checkpoint(small)
    moved = dataclasses.replace(ck, compress={**ck.compress, "source": "runs/x/original.pt"})
    assert compressed_report.find_original(moved) == (original, "")


def test_a_missing_or_changed_original_gives_no_ratio(made, probe, tmp_path):
    original, _, record = made
    torch.manual_seed(1)
    cfg = load_checkpoint(made[1]).model_config
    model = _sharp(build_model(cfg))
    missing = tmp_path / "nowhere" / "best.pt"
    gone = _save(tmp_path / "gone.pt", cfg, model, compress={**record, "source": str(missing)})
    report = export_checkpoint(gone, tmp_path / "gone.onnx", ExportOptions(val_samples=32))
    section = report.compressed
    assert section["original_checkpoint"] is None
    assert section["original_missing"] == f"the original {missing} was not found"
    assert section["latency_ms"]["compressed"] == 1.0
    assert section["latency_ms"]["original"] is None and section["latency_ms"]["speedup"] is None
    assert "was not found: no ratio" in report.format()
    # A file at the recorded path that is not the checkpoint compressed: refused by its hash.
    other = _save(tmp_path / "other.pt", CONFIG, _sharp(build_model(CONFIG)))
    changed = _save(tmp_path / "changed.pt", cfg, model, compress={**record, "source": str(other)})
    section = export_checkpoint(
        changed, tmp_path / "c.onnx", ExportOptions(val_samples=32)
    ).compressed
    assert section["original_checkpoint"] is None and section["latency_ms"]["speedup"] is None
    assert "is not the checkpoint that was compressed" in section["original_missing"]
    # MACs, params and top-1 come from the record, so they are there either way.
    assert section["macs"]["ratio"] == pytest.approx(record["speedup"], rel=1e-3)


def test_latency_that_cannot_be_measured_does_not_fail_the_export(made, monkeypatch, tmp_path):
    from convforge.errors import UserError

    def broken(backend, input_size):
        def measure_(model):
            raise UserError("ort-cpu is not installed")

        return measure_

    monkeypatch.setattr(latency, "latency_probe", broken)
    report = export_checkpoint(made[1], tmp_path / "s.onnx", ExportOptions(val_samples=32))
    lat = report.compressed["latency_ms"]
    assert lat["compressed"] is None and lat["not_measured"] == "ort-cpu is not installed"
    assert "latency  not measured (batch 1 on ort-cpu): ort-cpu is not installed" in (
        report.format()
    )


@pytest.mark.slow
def test_the_latency_is_measured_for_real(made, tmp_path):
    """The real probe, end to end: both models timed on ort-cpu (no assertion on which is
    faster: these models are tiny and the machine shared)."""
    _, small, _ = made
    report = export_checkpoint(small, tmp_path / "s.onnx", ExportOptions(val_samples=32))
    lat = report.compressed["latency_ms"]
    assert lat["original"] > 0 and lat["compressed"] > 0
    assert lat["speedup"] == round(lat["original"] / lat["compressed"], 3)


def test_cli_export_and_inspect_name_the_comparison(made, probe, tmp_path, capsys):
    _, small, record = made
    out = tmp_path / "small.onnx"
    assert main(["export", str(small), "-o", str(out), "--val-samples", "32"]) == 0
    printed = capsys.readouterr().out
    assert "compressed from" in printed and "2.00x faster" in printed
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"compressed: {record['speedup']:.2f}x fewer MACs than the original" in printed
    assert "top-1 90.00% -> 88.50% (-1.50 points" in printed
