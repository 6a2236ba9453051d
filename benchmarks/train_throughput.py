"""Training speed: convforge's trainer against a minimal hand-written loop, and
time-to-accuracy of the default recipe on digits.

    .venv/bin/python benchmarks/train_throughput.py [--epochs 3] [--repeats 3]

Part 1 trains the same model (the default recipe's ResNet-18, base width 16,
32 px digits) with the same data pipeline (DataLoader, augmentation), batch
size, optimizer and schedule, once through ``convforge.builder.training`` and
once through a plain ``for images, labels in loader`` loop, alternating
``--repeats`` times. Both time only the training passes (no evaluation).
Goal: trainer / hand-written images/s >= 0.95.

Part 2 runs the default recipe (`convforge train` with no options) and
reports the wall time from the start of training until the first epoch whose
validation accuracy reaches 99%. Goal: <= 60 s on a 2-core CPU.

Writes benchmarks/results/train_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from convforge.builder import build_model
from convforge.builder.data import augment
from convforge.builder.training.config import TrainConfig, recipe_model
from convforge.builder.training.optim import make_optimizer, make_scheduler, param_groups
from convforge.builder.training.trainer import data_config, load_data, train

RESULTS = Path(__file__).parent / "results"


def hand_written(cfg: TrainConfig, epochs: int) -> list[float]:
    """images/s of each epoch of the simplest correct loop over the same pipeline."""
    cfg = cfg.resolved()
    bundle = load_data(cfg)
    d = data_config(cfg, bundle)
    aug = cfg.augment.resolved(flip_safe=bundle.flip_safe)
    tf = augment.train_transform(aug, cfg.input_size, d["mean"], d["std"], bundle.native_size)
    gen = torch.Generator().manual_seed(0)
    train_set = bundle.train.with_transform(tf)
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        drop_last=True,
        sampler=RandomSampler(train_set, generator=gen),
    )
    model_cfg = dataclasses.replace(
        recipe_model("resnet18", cfg.input_size), num_classes=10, in_channels=1
    )
    torch.manual_seed(0)
    model = build_model(model_cfg)
    opt = make_optimizer(cfg, param_groups(model, cfg.weight_decay))
    sched = make_scheduler(cfg, opt, len(loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    rates = []
    for _ in range(epochs):
        model.train()
        seen, t0 = 0, time.perf_counter()
        for images, labels in loader:
            loss = criterion(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(labels)
        rates.append(seen / (time.perf_counter() - t0))
    return rates


def trainer(cfg: TrainConfig, epochs: int, out: Path) -> list[float]:
    """images/s of each epoch as convforge's trainer reports it (training passes only)."""
    cfg = dataclasses.replace(cfg, epochs=epochs, out=str(out))
    result = train(recipe_model("resnet18", cfg.input_size), cfg, progress=False)
    return [row["images_per_s"] for row in result.history]


def time_to_accuracy(out: Path, target: float = 0.99) -> dict:
    cfg = TrainConfig(out=str(out))  # the default recipe
    result = train(recipe_model("resnet18", cfg.input_size), cfg, progress=False)
    elapsed, reached = 0.0, None
    for row in result.history:
        elapsed += row["seconds"]
        if reached is None and row["val_acc"] >= target:
            reached = {"epoch": row["epoch"], "seconds": round(elapsed, 1)}
    return {
        "target_val_acc": target,
        "reached": reached,
        "best_val_acc": result.best_val_acc,
        "epochs": result.epochs_run,
        "total_train_and_eval_seconds": round(elapsed, 1),
        "val_images": len(load_data(cfg).val),
    }


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement (3)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats (3)")
    args = parser.parse_args()
    cfg = TrainConfig()
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            # Skip each run's first epoch: it pays one-time costs (allocator warm-up).
            ours += trainer(cfg, args.epochs, Path(tmp) / f"t{i}")[1:]
            plain += hand_written(cfg, args.epochs)[1:]
            print(
                f"repeat {i + 1}: trainer {statistics.median(ours):.0f} img/s, "
                f"hand-written {statistics.median(plain):.0f} img/s"
            )
        tta = time_to_accuracy(Path(tmp) / "tta")
    record = {
        "benchmark": "train_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "setup": "resnet18 base_width 16, small stem, digits 32 px, batch 64, SGD nesterov, "
        "cosine, label smoothing 0.1, augmentation 'standard', DataLoader workers 0",
        "throughput": {
            "trainer_images_per_s": {"median": round(statistics.median(ours), 1), "samples": ours},
            "hand_written_images_per_s": {
                "median": round(statistics.median(plain), 1),
                "samples": [round(x, 1) for x in plain],
            },
            "ratio_trainer_over_hand_written": round(
                statistics.median(ours) / statistics.median(plain), 3
            ),
            "goal_ratio": 0.95,
        },
        "time_to_accuracy": tta | {"goal_seconds": 60},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    t = record["throughput"]
    print(
        f"\ntrainer {t['trainer_images_per_s']['median']:.0f} img/s vs hand-written "
        f"{t['hand_written_images_per_s']['median']:.0f} img/s: ratio "
        f"{t['ratio_trainer_over_hand_written']:.3f} (goal >= 0.95)"
    )
    reached = tta["reached"]
    print(
        "time to 99% val accuracy: "
        + (f"{reached['seconds']} s (epoch {reached['epoch']})" if reached else "not reached")
        + f"; best {tta['best_val_acc']:.2%} in {tta['epochs']} epochs (goal <= 60 s)"
    )


if __name__ == "__main__":
    main()
