"""``convforge finetune``: pretrained weights + new data -> a trained run.

Loads the pretrained model, adapts head and input channels to the dataset,
picks a fine-tuning schedule (``--strategy auto`` applies :func:`transfer.decide`
after two linear probes), and hands model and schedule to the trainer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from convforge.builder import transfer
from convforge.builder.data import augment
from convforge.builder.registry import build_model
from convforge.builder.training.config import TrainConfig
from convforge.builder.training.trainer import TrainResult, data_config, load_data, train
from convforge.settings import setting


@dataclasses.dataclass
class FinetuneOptions:
    pretrained: str = setting(help="convforge .pt checkpoint or torchvision state_dict .pth file")
    arch: str | None = setting(
        None, "architecture of a bare state_dict file (e.g. resnet18)", flag="--model"
    )
    strategy: str = setting("auto", f"{', '.join(transfer.STRATEGIES)}")
    freeze_until: str | None = setting(None, "finetune: last frozen stage, e.g. stem, layer2")
    backbone_lr_mult: float = setting(0.1, "LR multiplier of the trainable backbone stages")
    unfreeze_at: int = setting(0, "1-based epoch from which frozen stages train too (0 = never)")


def finetune(
    opts: FinetuneOptions, cfg: TrainConfig, log=print, progress: bool = True
) -> TrainResult:
    """Fine-tune ``opts.pretrained`` on ``cfg.dataset``; returns the trainer's result.
    ``progress``: the trainer's per-epoch log."""
    from convforge.errors import check_choice

    check_choice("strategy", opts.strategy, transfer.STRATEGIES)
    if cfg.lr is None:
        # Pretrained weights want gentler steps: a tenth of the from-scratch default.
        cfg = dataclasses.replace(cfg, lr=0.1 * TrainConfig(**_fields(cfg, lr=None)).resolved().lr)
    cfg = cfg.resolved()
    model, pre_cfg = transfer.load_pretrained(opts.pretrained, opts.arch)
    # The data keeps its own channels; the first conv adapts instead (for gray images that
    # is exactly the pretrained RGB model applied to gray replicated three times, 3x cheaper).
    bundle = load_data(cfg)
    model, model_cfg = transfer.adapt(model, pre_cfg, len(bundle.classes), bundle.channels)
    if opts.strategy == "auto":
        schedule = _auto_schedule(model, model_cfg, cfg, bundle, opts, log)
    else:
        schedule = transfer.make_schedule(
            model,
            opts.strategy,
            opts.freeze_until,
            opts.backbone_lr_mult,
            opts.unfreeze_at,
            reason=f"--strategy {opts.strategy}",
        )
    log(
        f"transfer: {schedule.strategy}, frozen: {', '.join(schedule.frozen) or 'nothing'}, "
        f"backbone LR x {schedule.backbone_lr_mult} ({schedule.reason})"
    )
    extra = {"pretrained": str(Path(opts.pretrained))}
    return train(
        model_cfg,
        cfg,
        schedule=schedule,
        model=model,
        bundle=bundle,
        extra=extra,
        progress=progress,
    )


def _auto_schedule(model, model_cfg, cfg, bundle, opts, log) -> transfer.TransferSchedule:
    """Probe pretrained vs random features, then apply the lecture's table."""
    stats = data_config(cfg, bundle)
    tf = augment.eval_transform(cfg.input_size, stats["mean"], stats["std"], bundle.native_size)
    train_set, val_set = bundle.train.with_transform(tf), bundle.val.with_transform(tf)
    log("strategy auto: linear probes on pretrained and random features ...")
    probe_pre = transfer.linear_probe(model, train_set, val_set)
    torch.manual_seed(cfg.seed)
    random_model = build_model(model_cfg)
    probe_rand = transfer.linear_probe(random_model, train_set, val_set)
    names = list(transfer.stages(model))
    d = transfer.decide(len(bundle.train), len(bundle.classes), probe_pre, probe_rand, names)
    log(f"strategy auto chose: {d.row}\n  because {d.reason}")
    return transfer.make_schedule(
        model,
        d.strategy,
        d.freeze_until,
        d.backbone_lr_mult,
        opts.unfreeze_at,
        reason=f"auto: {d.row}; {d.reason}",
    )


def _fields(cfg: TrainConfig, **overrides) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} | overrides
