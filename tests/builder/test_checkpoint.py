import os

import pytest
import torch
import torchvision

from convforge.builder.checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from convforge.errors import UserError


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_round_trip_and_weights_only(tmp_path):
    payload = {"model_state": {"w": torch.ones(2)}, "model_config": {"arch": "plain"},
               "data_config": {"classes": ["a"]}, "epoch": 3}  # fmt: skip
    save_checkpoint(tmp_path / "c.pt", payload)
    ck = load_checkpoint(tmp_path / "c.pt")
    assert ck["epoch"] == 3 and ck["format"].startswith("convforge.checkpoint/")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["epoch"] == 3
    assert os.listdir(tmp_path) == ["c.pt"]


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
