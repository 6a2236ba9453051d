"""Checkpoint files: written atomically, read with ``weights_only=True`` only.

A convforge checkpoint (``*.pt``) is a dict of tensors and plain Python
values (docs/file-contract.md): ``model_state``, ``model_config``, ``data_config``,
``optimizer_state``, ``scheduler_state``, ``epoch``, ``metrics``,
``rng_state``, plus ``train_config``, ``scaler_state``, ``ema_state``,
``history``, ``transfer``, ``versions`` and, for a model ``convforge compress``
made, ``compress``. Writing takes that dict
(:func:`save_checkpoint`); reading gives a typed :class:`Checkpoint`
(:func:`load_checkpoint`) whose :meth:`~Checkpoint.build_model` rebuilds the
model with its weights, so no reader picks keys by hand. Reading never
unpickles arbitrary objects: a file that needs more than tensors and
containers is refused.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from convforge.builder.registry import ModelConfig, build_model
from convforge.errors import UserError, first_line
from convforge.files import atomic_write

FORMAT = "convforge.checkpoint/1"
REQUIRED_KEYS = ("model_state", "model_config", "data_config", "epoch")
# Entries some checkpoints lack (one not written by the trainer); typed fields of Checkpoint.
OPTIONAL_KEYS = ("train_config", "metrics", "history", "transfer", "compress")
# What every ``compress`` record holds (the rest, e.g. ``target`` and ``rounds``, is
# ``convforge compress``'s own): the original checkpoint's path and sha256, its ``original``
# {macs, params, top1} and the kept model's macs, params, speedup (original MACs / its MACs)
# and top1 (in [0, 1], on the original's validation split).
COMPRESS_KEYS = ("source", "source_sha256", "original", "macs", "params", "speedup", "top1")


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
        raise UserError(f"{path} is not a readable PyTorch file: {first_line(e)[:160]}") from None


@dataclass(frozen=True)
class Checkpoint:
    """A convforge checkpoint as read from disk (:func:`load_checkpoint`).

    The four entries every checkpoint has and the optional ones several readers
    share are typed fields; an optional entry the file lacks reads as empty
    (``{}``, ``[]``) or None. Every other entry is in ``extra`` as stored: the
    trainer's resume state (``optimizer_state``, ``scheduler_state``,
    ``scaler_state``, ``ema_state``, ``rng_state``), ``versions``, ``format``
    and what a writer added (fine-tuning's ``pretrained``). The fields cannot
    be rebound; the dicts are the file's own, not copies.
    """

    path: Path  # the file it was read from (errors name it)
    model_config: ModelConfig  # as stored: resolved when the trainer wrote it
    model_state: dict[str, torch.Tensor]  # the model's state_dict
    data_config: dict  # how to preprocess and where the data is (trainer.data_config's keys)
    epoch: int  # epochs completed when it was written (1-based count)
    train_config: dict = field(default_factory=dict)  # the TrainConfig as a dict; {}: none
    metrics: dict = field(default_factory=dict)  # last epoch's row + best_val_acc, best_epoch
    history: list[dict] = field(default_factory=list)  # one row per epoch, as in metrics.csv
    transfer: dict | None = None  # the fine-tuning schedule's record (FinetuneSchedule.as_dict)
    compress: dict | None = None  # convforge compress's record (COMPRESS_KEYS, more); None: none
    extra: dict = field(default_factory=dict)  # every other entry, by its key

    @classmethod
    def from_payload(cls, payload: object, path: str | os.PathLike) -> Checkpoint:
        """The checkpoint in ``payload`` (a dict as :func:`save_checkpoint` writes it, read
        from ``path``); UserError naming what is missing if it is not one."""
        if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED_KEYS):
            have = (
                ", ".join(sorted(map(str, payload))[:8])
                if isinstance(payload, dict)
                else type(payload).__name__
            )
            raise UserError(
                f"{path} is not a convforge checkpoint "
                f"(needs keys {', '.join(REQUIRED_KEYS)}; has {have})"
            )
        try:
            model_config = ModelConfig(**payload["model_config"])
        except TypeError as e:  # not a mapping, or keys ModelConfig does not have
            raise UserError(
                f"{path}: its model_config is not a model configuration ({first_line(e)})"
            ) from None
        _check_compress(payload.get("compress"), path)
        return cls(
            path=Path(path),
            model_config=model_config,
            model_state=payload["model_state"],
            data_config=payload["data_config"],
            epoch=payload["epoch"],
            **{k: payload[k] for k in OPTIONAL_KEYS if payload.get(k) is not None},
            extra={k: v for k, v in payload.items() if k not in REQUIRED_KEYS + OPTIONAL_KEYS},
        )

    def build_model(self) -> nn.Module:
        """The model ``model_config`` describes with ``model_state`` loaded (strictly), in
        the mode :func:`~convforge.builder.build_model` leaves it (training). UserError if the
        config does not build or the weights do not fit it."""
        return model_with_weights(self.model_config, self.model_state, self.path)


def _check_compress(record: object, path: str | os.PathLike) -> None:
    """UserError when a checkpoint's ``compress`` entry is there but is not a record of
    :data:`COMPRESS_KEYS` (export and the runtime read them)."""
    if record is None:
        return
    original = record.get("original") if isinstance(record, dict) else None
    if (
        not isinstance(original, dict)
        or any(k not in record for k in COMPRESS_KEYS)
        or any(k not in original for k in ("macs", "params", "top1"))
    ):
        raise UserError(
            f"{path}: its compress entry is not a compress record (needs "
            f"{', '.join(COMPRESS_KEYS)}; original with macs, params and top1)"
        )


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a convforge checkpoint; UserError naming what is missing if it is not one."""
    return Checkpoint.from_payload(read_weights_file(path), path)


def model_with_weights(cfg: ModelConfig, state: dict, source: str | os.PathLike) -> nn.Module:
    """``build_model(cfg)`` with ``state`` loaded strictly. UserError naming ``source`` when
    the config does not build, or with the missing, unexpected and mis-shaped keys when
    ``state`` does not fit the model."""
    try:
        with torch.device("meta"):
            build_model(cfg)  # checks the config before the real (slower) build
        model = build_model(cfg)
    except (TypeError, RuntimeError) as e:  # an option of the wrong type, say
        raise UserError(f"{source}: its model config does not build ({first_line(e)})") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise UserError(f"{source} does not match {cfg.arch}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return model


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
