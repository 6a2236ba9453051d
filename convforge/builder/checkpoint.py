"""Checkpoint files: written atomically, read with ``weights_only=True`` only.

A convforge checkpoint (``*.pt``) is a dict of tensors and plain Python
values (DESIGN.md): ``model_state``, ``model_config``, ``data_config``,
``optimizer_state``, ``scheduler_state``, ``epoch``, ``metrics``,
``rng_state``, plus ``train_config``, ``scaler_state``, ``ema_state``,
``history`` and ``versions``. Reading never unpickles arbitrary objects: a
file that needs more than tensors and containers is refused.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from convforge.errors import UserError
from convforge.files import atomic_write

FORMAT = "convforge.checkpoint/1"
REQUIRED_KEYS = ("model_state", "model_config", "data_config", "epoch")


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` (plus the format tag) to ``path`` atomically."""
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, **payload}, f)


def read_weights_file(path: str | os.PathLike) -> object:
    """Load a torch file with ``weights_only=True``; UserError when it is missing or unsafe."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long; its "GLOBAL module.name" names the culprit.
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        if culprit is None:
            detail = re.search(r"WeightsUnpickler error: (.*)", str(e))
            reason = (detail.group(1).strip() if detail else "") or "not written by torch.save"
            raise UserError(f"{path} is not a readable PyTorch file: {reason[:120]}") from None
        raise UserError(
            f"{path} holds objects other than tensors and plain containers "
            f"({culprit.group(1)}); convforge refuses to unpickle them"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(
            f"{path} is not a readable PyTorch file: {str(e).splitlines()[0][:160]}"
        ) from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a convforge checkpoint; UserError naming what is missing if it is not one."""
    data = read_weights_file(path)
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        have = (
            ", ".join(sorted(map(str, data))[:8]) if isinstance(data, dict) else type(data).__name__
        )
        raise UserError(
            f"{path} is not a convforge checkpoint "
            f"(needs keys {', '.join(REQUIRED_KEYS)}; has {have})"
        )
    return data


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A bare ``state_dict`` file (e.g. torchvision's ``.pth``): a dict of name -> tensor.

    Also accepts a convforge checkpoint (returns its ``model_state``) and the
    common ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers.
    """
    data = read_weights_file(path)
    if isinstance(data, dict) and "model_state" in data:
        data = data["model_state"]
    elif isinstance(data, dict):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if (
        not isinstance(data, dict)
        or not data
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())
    ):
        raise UserError(f"{path} is neither a convforge checkpoint nor a state_dict of tensors")
    return data
