"""A picture of what the augmentation does: evaluation view beside random training views.

Looking at the training views is the quickest check that an augmentation
setting is sane (digits still readable, crops not all background, colours not
washed out) before spending hours training on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convforge.builder.data.augment import (
    AugmentConfig,
    batch_mix,
    eval_transform,
    require_resolved,
    train_transform,
)
from convforge.builder.data.images import ImageSet
from convforge.errors import UserError
from convforge.plots import pyplot, save_png


def _pick(targets: list[int], count: int, gen: torch.Generator) -> list[int]:
    """``count`` random indices, taking the classes in turn so that many classes show."""
    by_class: dict[int, list[int]] = {}
    for i in torch.randperm(len(targets), generator=gen).tolist():
        by_class.setdefault(targets[i], []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    picks: list[int] = []
    while len(picks) < count:
        for queue in queues:
            if queue and len(picks) < count:
                picks.append(queue.pop())
    return picks


def _show(ax, x: Tensor, mean: list[float], std: list[float]) -> None:
    """Draw a normalized ``[C, H, W]`` image, denormalized to [0, 1]; 1 channel in gray."""
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    img = (x.detach().float().cpu() * s + m).clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")


def _short(name: str, width: int = 12) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def preview_grid(
    images: ImageSet,
    aug: AugmentConfig,
    input_size: int,
    mean: list[float],
    std: list[float],
    native_size: int | None,
    path,
    samples: int = 8,
    variants: int = 7,
    seed: int = 0,
) -> None:
    """Write a PNG grid: one row per sample, its evaluation view then ``variants`` training views.

    ``aug`` must be resolved. Samples are drawn at random (classes in turn)
    and labelled with their class names. With Mixup or CutMix on, a last row
    shows one mixed batch of training views, each titled with its two largest
    label weights. The same ``seed`` gives the same picture; the caller's
    random state is left untouched.
    """
    plt = pyplot()

    aug = require_resolved(aug)
    for name, value, least in (("samples", samples, 1), ("variants", variants, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"preview {name} must be a whole number >= {least}, got {value!r}")
    if len(images) == 0:
        raise UserError("cannot preview augmentation of an empty dataset")
    train_tf = train_transform(aug, input_size, mean, std, native_size)
    eval_tf = eval_transform(input_size, mean, std, native_size)
    mix = batch_mix(aug, len(images.classes)) if len(images.classes) >= 2 else None
    picks = _pick(images.targets, min(samples, len(images)), torch.Generator().manual_seed(seed))
    # v2 transforms draw from the global RNG; fork it so the caller's stream is not disturbed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rows = []
        for i in picks:
            raw = images.load(i)
            rows.append([eval_tf(raw)] + [train_tf(raw) for _ in range(variants)])
        if mix is not None:
            batch = torch.stack([train_tf(images.load(i)) for i in picks])
            labels = torch.tensor([images.targets[i] for i in picks], dtype=torch.int64)
            mixed, soft = mix(batch, labels)

    cols = 1 + variants
    n_rows = len(rows) + (mix is not None)
    fig, axes = plt.subplots(n_rows, cols, figsize=(1.5 * cols + 0.6, 1.55 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for r, (i, views) in enumerate(zip(picks, rows, strict=True)):
        for c, x in enumerate(views):
            _show(axes[r, c], x, mean, std)
        axes[r, 0].set_ylabel(_short(images.classes[images.targets[i]]), fontsize=9)
    axes[0, 0].set_title("eval", fontsize=9)
    for c in range(1, cols):
        axes[0, c].set_title(f"train {c}", fontsize=9)
    if mix is not None:
        r = len(rows)
        axes[r, 0].set_ylabel("mixup/cutmix", fontsize=9)
        for c in range(min(cols, len(mixed))):
            _show(axes[r, c], mixed[c], mean, std)
            weights, classes = soft[c].topk(min(2, soft.shape[1]))
            title = "\n".join(
                f"{_short(images.classes[k], 8)} {w:.2f}"
                for w, k in zip(weights.tolist(), classes.tolist(), strict=True)
                if w > 0
            )
            axes[r, c].set_title(title, fontsize=7)
    fig.suptitle(f"augmentation preview: preset {aug.preset}, {input_size} px", fontsize=10)
    save_png(fig, path)
