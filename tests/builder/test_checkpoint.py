import dataclasses
import os

import pytest
import torch
import torchvision

from convforge.builder import ModelConfig, build_model
from convforge.builder.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_state_dict,
    save_checkpoint,
)
from convforge.builder.training.trainer import train
from convforge.errors import UserError


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_round_trip_and_weights_only(tmp_path):
    payload = {"model_state": {"w": torch.ones(2)}, "model_config": {"arch": "plain"},
               "data_config": {"classes": ["a"]}, "epoch": 3}  # fmt: skip
    save_checkpoint(tmp_path / "c.pt", payload)
    ck = load_checkpoint(tmp_path / "c.pt")
    assert ck.epoch == 3 and ck.extra["format"].startswith("convforge.checkpoint/")
    assert ck.path == tmp_path / "c.pt" and ck.model_config == ModelConfig("plain")
    # The optional parts a file lacks read as empty.
    assert (ck.train_config, ck.metrics, ck.history, ck.transfer) == ({}, {}, [], None)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["epoch"] == 3
    assert os.listdir(tmp_path) == ["c.pt"]


def _trainer_payload() -> dict:
    """Every entry the trainer writes (DESIGN.md), as a pre-Checkpoint convforge wrote it:
    a plain dict saved with torch.save, its model_config a dict."""
    cfg = ModelConfig("plain", num_classes=3, in_channels=1, stem="small",
                      options={"depth": 2, "width": 4}).resolved()  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    return {
        "format": "convforge.checkpoint/1",
        "model_state": model.state_dict(),
        "model_config": dataclasses.asdict(cfg),
        "data_config": {"dataset": "digits", "classes": ["a", "b", "c"], "mean": [0.5],
                        "std": [0.25], "input_size": 8, "resize_size": 8, "channels": 1},
        "train_config": {"dataset": "digits", "seed": 7, "val_fraction": 0.2},
        "optimizer_state": {"state": {}, "param_groups": []},
        "scheduler_state": {"last_epoch": 10},
        "scaler_state": None,
        "ema_state": None,
        "epoch": 2,
        "metrics": {"epoch": 2, "val_acc": 0.5, "best_val_acc": 0.75, "best_epoch": 1},
        "history": [{"epoch": 1, "val_acc": 0.75}, {"epoch": 2, "val_acc": 0.5}],
        "rng_state": {"torch": torch.get_rng_state()},
        "transfer": {"strategy": "finetune", "frozen": ["stem"], "backbone_lr_mult": 0.1,
                     "unfreeze_at": 0, "reason": "--strategy finetune"},
        "versions": {"convforge": "0.0", "torch": "2.0"},
        "pretrained": "pre/best.pt",
    }  # fmt: skip


def test_a_checkpoint_written_before_the_typed_reader_reads_into_its_fields(tmp_path):
    payload = _trainer_payload()
    torch.save(payload, tmp_path / "old.pt")  # not save_checkpoint: the bytes an old run left
    ck = load_checkpoint(tmp_path / "old.pt")
    assert isinstance(ck, Checkpoint) and isinstance(ck.model_config, ModelConfig)
    assert dataclasses.asdict(ck.model_config) == payload["model_config"]
    assert ck.data_config == payload["data_config"] and ck.epoch == 2
    assert ck.train_config["seed"] == 7 and ck.metrics["best_epoch"] == 1
    assert [row["epoch"] for row in ck.history] == [1, 2]
    assert ck.transfer["strategy"] == "finetune"
    # Every entry without a field of its own is kept in extra, as stored.
    assert set(ck.extra) == {"format", "optimizer_state", "scheduler_state", "scaler_state",
                             "ema_state", "rng_state", "versions", "pretrained"}  # fmt: skip
    assert ck.extra["pretrained"] == "pre/best.pt"
    assert ck.extra["scheduler_state"] == {"last_epoch": 10}
    with pytest.raises(dataclasses.FrozenInstanceError):
        ck.epoch = 3


def test_build_model_rebuilds_the_trained_model_with_its_weights(tmp_path):
    payload = _trainer_payload()  # its model built with seed 0
    save_checkpoint(tmp_path / "c.pt", payload)
    torch.manual_seed(1)  # another seed: the weights must come from the file
    model = load_checkpoint(tmp_path / "c.pt").build_model()
    assert model.training  # as build_model leaves it; callers choose eval()
    torch.manual_seed(0)
    reference = build_model(ModelConfig(**payload["model_config"])).eval()
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)
    assert model.state_dict().keys() == payload["model_state"].keys()


def test_build_model_refuses_weights_of_another_model_in_one_line(tmp_path):
    payload = _trainer_payload()
    payload["model_config"]["options"] = {"depth": 3, "width": 4}  # the weights are depth 2
    save_checkpoint(tmp_path / "c.pt", payload)
    ck = load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(UserError, match=r"c.pt does not match plain: missing: ") as e:
        ck.build_model()
    assert "\n" not in str(e.value)


def _compress_record() -> dict:
    """What `convforge compress` adds to the checkpoint it writes (builder/compress/job.py)."""
    return {
        "source": "runs/r18/best.pt", "source_sha256": "ab" * 32, "target": {"speedup": 2.0},
        "max_drop": 0.5, "importance": "l2", "steps": 3, "epochs": 3, "distill_weight": 0.5,
        "dataset": "digits", "original": {"macs": 1000, "params": 100, "top1": 0.9},
        "rounds": [{"round": 1, "macs": 500, "passed": True}], "kept": 1,
        "macs": 500, "params": 40, "speedup": 2.0, "top1": 0.895,
    }  # fmt: skip


def test_a_compressed_checkpoint_reads_its_record_into_a_field(tmp_path):
    payload = {**_trainer_payload(), "compress": _compress_record()}
    payload["model_config"]["widths"] = {"body.0.conv": [2, 1]}  # recorded by compress, too
    save_checkpoint(tmp_path / "small.pt", payload)
    ck = load_checkpoint(tmp_path / "small.pt")
    assert ck.compress == _compress_record() and "compress" not in ck.extra
    assert ck.model_config.widths == {"body.0.conv": [2, 1]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        ck.compress = None
    # Every other checkpoint is no compressed model.
    save_checkpoint(tmp_path / "c.pt", _trainer_payload())
    assert load_checkpoint(tmp_path / "c.pt").compress is None


@pytest.mark.parametrize(
    "record",
    [
        "small.pt",  # not a record at all
        {k: v for k, v in _compress_record().items() if k != "source_sha256"},
        {**_compress_record(), "original": {"macs": 1000, "params": 100}},  # no top1
        {**_compress_record(), "original": 0.9},
    ],
)
def test_a_compress_entry_that_is_no_record_is_one_line(record, tmp_path):
    save_checkpoint(tmp_path / "c.pt", {**_trainer_payload(), "compress": record})
    with pytest.raises(UserError, match=r"c.pt: its compress entry is not a compress record "
                       r"\(needs source, source_sha256, original, macs") as e:  # fmt: skip
        load_checkpoint(tmp_path / "c.pt")
    assert "\n" not in str(e.value)


def test_a_model_config_that_is_not_one_is_a_user_error(tmp_path):
    payload = {**_trainer_payload(), "model_config": {"arch": "plain", "wings": 2}}
    save_checkpoint(tmp_path / "c.pt", payload)
    with pytest.raises(UserError, match=r"c.pt: its model_config is not a model configuration"):
        load_checkpoint(tmp_path / "c.pt")


def test_only_a_trainer_checkpoint_resumes(tmp_path):
    payload = {key: value for key, value in _trainer_payload().items() if key != "train_config"}
    save_checkpoint(tmp_path / "c.pt", payload)
    with pytest.raises(UserError, match=r"c.pt has no train_config: only a last.pt written by"):
        train(None, None, resume=tmp_path / "c.pt", progress=False)


def test_arbitrary_objects_are_never_unpickled(tmp_path):
    torch.save({"model_state": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"refuses to unpickle"):
        load_checkpoint(tmp_path / "evil.pt")


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="is not a readable PyTorch file"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="is not a convforge checkpoint .needs keys model_state"):
        load_checkpoint(tmp_path / "other.pt")


def test_state_dict_files(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, tmp_path / "r18.pth")
    assert load_state_dict(tmp_path / "r18.pth").keys() == sd.keys()
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    assert load_state_dict(tmp_path / "wrapped.pth").keys() == sd.keys()
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match="neither a convforge checkpoint nor a state_dict"):
        load_state_dict(tmp_path / "list.pth")
