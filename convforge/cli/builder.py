"""The builder's commands: models, diagnose init, train, finetune, compress, augment-preview.

Their options are generated from ``ModelConfig``, ``TrainConfig``,
``AugmentConfig`` and ``FinetuneOptions`` (see :mod:`.arguments`); the
architecture options (``--depth``, ``--base-width``, ...) from the model
registry. Building a parser here imports torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from convforge.cli.arguments import add_json, add_settings, csv, settings_from, settings_values
from convforge.errors import UserError, check_int


def _add_model(p, *, defaults: dict, skip: tuple[str, ...] = ()) -> None:
    """ModelConfig's fields, then one option per architecture option of the registry."""
    from convforge.builder.registry import ModelConfig, get_entry, list_models

    add_settings(p, ModelConfig, "model", defaults=defaults, skip=skip)
    owners: dict[str, tuple[object, list[str]]] = {}
    for name in list_models():
        for key, default in get_entry(name).options.items():
            owners.setdefault(key, (default, []))[1].append(name)
    g = p.add_argument_group("architecture options")
    for key, (default, models) in owners.items():
        g.add_argument(
            "--" + key.replace("_", "-"),
            dest=f"arch_{key}",
            type=type(default),
            metavar=key.upper(),
            help=f"{', '.join(models)} only (default: {default})",
        )


def _arch_options(args) -> dict:
    prefix = "arch_"
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v}


def _add_train(p, out: str) -> None:
    from convforge.builder.data.augment import AugmentConfig
    from convforge.builder.training.config import TrainConfig

    add_settings(p, TrainConfig, "training", defaults={"out": out})
    add_settings(p, AugmentConfig, "augmentation (training only; unset: the preset's value)")
    p.add_argument(
        "--resume",
        help="continue the run in this last.pt exactly (other options come from the checkpoint)",
    )
    add_json(p)


def _train_config(args):
    from convforge.builder.data.augment import AugmentConfig
    from convforge.builder.training.config import TrainConfig

    return settings_from(TrainConfig, args, augment=settings_from(AugmentConfig, args))


def _print_result(args, result) -> None:
    if args.json:
        record = {
            "out": str(result.out),
            "best_val_acc": result.best_val_acc,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "seconds": round(result.seconds, 2),
            "history": result.history,
        }
        print(json.dumps(record, indent=2))
        return
    print(
        f"best val accuracy {result.best_val_acc:.2%} at epoch {result.best_epoch}; "
        f"{result.out / 'best.pt'}, metrics.csv and curves.png in {result.out}"
    )


# -- models ----------------------------------------------------------------------------------


def models_parser(p: argparse.ArgumentParser) -> None:
    from convforge.builder.registry import ModelConfig

    p.description = (
        "List every registered model with its parameter count and compute "
        "(GMACs/GFLOPs) for one image at --input-size."
    )
    p.add_argument("--input-size", type=int, default=224, help="square input side in px (224)")
    add_settings(p, ModelConfig, "model", only=("stem", "in_channels", "num_classes"))
    add_json(p)
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    from tqdm import tqdm

    from convforge.builder import ModelConfig, list_models
    from convforge.builder.complexity import as_record, format_records, measure

    records = []
    # disable=None shows the bar only on a terminal.
    bar = tqdm(
        list_models(), desc="measuring", unit="model", leave=False, disable=args.json or None
    )
    for name in bar:
        cfg = settings_from(ModelConfig, args, arch=name)
        records.append(as_record(cfg, measure(cfg, args.input_size)))
    print(json.dumps(records, indent=2) if args.json else format_records(records))
    return 0


# -- diagnose init ---------------------------------------------------------------------------


def diagnose_parser(p: argparse.ArgumentParser) -> None:
    p.description = "Diagnostic experiments from the CNN-training lecture."
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    p = sub.add_parser(
        "init",
        help="per-layer activation statistics under each weight init",
        description="The lecture's weight-initialization experiment: push one batch of "
        "unit-Gaussian inputs through a fresh model and report each activation layer's mean "
        "and std, once per init rule, as a table, a PNG plot and JSON. Too small an init "
        "collapses activations toward 0 with depth; kaiming (relu) and xavier (tanh) keep "
        "them steady. Normalization is off by default so only the weights act.",
    )
    _add_model(
        p,
        defaults={"arch": "plain", "stem": "small", "norm": "none"},
        skip=("init", "zero_init_residual"),
    )
    g = p.add_argument_group("experiment")
    g.add_argument(
        "--init",
        dest="inits",
        default="small,xavier,kaiming",
        help="comma-separated init rules to compare (default: small,xavier,kaiming)",
    )
    g.add_argument("--input-size", type=int, default=32, help="square input side in px (32)")
    g.add_argument("--batch-size", type=int, default=32, help="images in the batch (32)")
    g.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (0)")
    g.add_argument(
        "--seeds",
        type=int,
        default=10,
        help="also report each depth ratio's median and range over seeds 0..N-1 (10; one "
        "draw's ratio varies widely); 1 = the table's seed only",
    )
    g.add_argument("--out", default="runs/diagnose", help="folder for the PNG and JSON")
    add_json(p)
    p.set_defaults(func=cmd_diagnose_init)


def cmd_diagnose_init(args) -> int:
    from convforge.builder import ModelConfig
    from convforge.builder.diagnose_init import (
        as_record,
        format_runs,
        format_spread,
        plot_init_experiment,
        ratio_spread,
        run_init_experiment,
    )
    from convforge.files import together

    inits = csv(args.inits)
    if not inits:
        raise UserError("--init needs at least one of: small, xavier, kaiming")
    seeds = check_int("--seeds", args.seeds)
    config = settings_from(ModelConfig, args, options=_arch_options(args))
    runs = run_init_experiment(config, inits, args.input_size, args.batch_size, args.seed)
    cfg = runs[0].config
    out = Path(args.out)
    stem = f"init-{cfg.arch}-{cfg.activation}-{cfg.norm}"
    with together() as staging:  # the plot and the JSON appear together, or neither
        if not out.is_dir():
            staging.folder(out)  # a new --out folder appears only with them in it
        plot_init_experiment(runs, staging.file(out / f"{stem}.png"))
        record = as_record(runs)
        record["plot"] = str(out / f"{stem}.png")
        spread = None
        if seeds > 1:
            spread = ratio_spread(config, inits, range(seeds), args.input_size, args.batch_size)
            record["depth_ratio_spread"] = spread
        json_path = staging.file(out / f"{stem}.json")
        json_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(format_runs(runs))
    if spread:
        print("depth ratio " + format_spread(spread))
    print(f"\nplot: {out / f'{stem}.png'}\njson: {out / f'{stem}.json'}")
    return 0


# -- train -----------------------------------------------------------------------------------


def train_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Train a model on a dataset with the lecture's techniques. Writes best.pt, "
        "last.pt, metrics.csv, curves.png and config.json to --out. Under torchrun it trains "
        "with DistributedDataParallel (gloo on CPU, nccl on GPU). Small-stem ResNets default "
        "to --base-width 16 (the CIFAR-ResNet widths); --stem auto picks small up to 64 px. "
        "The classes and input channels come from the data."
    )
    _add_model(
        p, defaults={"arch": "resnet18", "stem": "auto"}, skip=("num_classes", "in_channels")
    )
    _add_train(p, out="runs/train")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from convforge.builder import ModelConfig
    from convforge.builder.training.config import recipe_model
    from convforge.builder.training.trainer import train

    fields = settings_values(ModelConfig, args)
    model_cfg = recipe_model(
        fields.pop("arch"),
        args.input_size,
        stem=fields.pop("stem"),
        options=_arch_options(args),
        **fields,
    )
    result = train(model_cfg, _train_config(args), resume=args.resume, progress=not args.json)
    _print_result(args, result)
    return 0


# -- finetune --------------------------------------------------------------------------------


def finetune_parser(p: argparse.ArgumentParser) -> None:
    from convforge.builder.finetune import FinetuneOptions

    p.description = (
        "Fine-tune pretrained weights (a convforge checkpoint or a torchvision "
        "state_dict .pth on disk) on a new dataset: the head is replaced for the new classes. "
        "--strategy auto applies the lecture's rule of thumb: data is 'small' below "
        "500 training images per class, and the domain 'similar' when a linear probe on the "
        "pretrained features beats one on random features by 10 points or more. "
        "--lr defaults to a tenth of train's."
    )
    add_settings(p, FinetuneOptions, "transfer")
    _add_train(p, out="runs/finetune")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from convforge.builder.finetune import FinetuneOptions, finetune
    from convforge.builder.training.trainer import train

    if args.resume:
        result = train(None, None, resume=args.resume, progress=not args.json)
    else:
        if not args.pretrained:
            raise UserError("finetune needs --pretrained FILE (or --resume last.pt)")
        log = (lambda *a: None) if args.json else print
        result = finetune(settings_from(FinetuneOptions, args), _train_config(args), log=log)
    _print_result(args, result)
    return 0


# -- compress --------------------------------------------------------------------------------


def compress_parser(p: argparse.ArgumentParser) -> None:
    from convforge.builder.compress import CompressOptions

    p.description = (
        "Make a trained model smaller: structured channel pruning (Torch-Pruning) in --rounds "
        "rounds towards --speedup (MACs) or --latency-ms (measured on --backend), each round "
        "fine-tuned by the trainer for --epochs with distillation from the original, and "
        "checked on the checkpoint's validation split: the result is the last round within "
        "--max-drop top-1 points of the original. The output is an ordinary checkpoint (its "
        "widths recorded) for export, finetune and tune. An interrupted run resumes when the "
        "same command is given again (the rounds are kept in OUT.rounds/ until it ends)."
    )
    p.add_argument("checkpoint", help="a convforge checkpoint written by train or finetune")
    p.add_argument("-o", "--out", required=True, help="the compressed checkpoint, e.g. small.pt")
    add_settings(p, CompressOptions, "compress")
    add_json(p)
    p.set_defaults(func=cmd_compress)


def cmd_compress(args) -> int:
    from convforge.builder.compress import CompressOptions, compress

    opts = settings_from(CompressOptions, args, checkpoint=args.checkpoint, out=args.out).check()
    latency = None
    if opts.latency_ms is not None:
        from convforge.builder.checkpoint import load_checkpoint
        from convforge.export.latency import latency_probe

        data = load_checkpoint(opts.checkpoint).data_config
        size = data["input_size"]
        latency = latency_probe(opts.backend, (data["channels"], size, size))
    log = (lambda *a: None) if args.json else print
    result = compress(opts, latency=latency, log=log, progress=not args.json)
    record = result.record
    if args.json:
        summary = {"out": str(result.out), "seconds": round(result.seconds, 1),
                   "peak_memory_mb": result.peak_memory_mb, **record}  # fmt: skip
        print(json.dumps(summary, indent=2))
        return 0
    original = record["original"]
    print(
        f"{result.out}: {record['speedup']:.2f}x fewer MACs "
        f"({original['macs'] / 1e9:.3f} -> {record['macs'] / 1e9:.3f} GMACs, "
        f"{original['params'] / 1e6:.2f} -> {record['params'] / 1e6:.2f} M params), "
        f"top-1 {original['top1']:.2%} -> {record['top1']:.2%} "
        f"(round {record['kept']} of {len(record['rounds'])}; {result.seconds:.0f} s, "
        f"peak memory {result.peak_memory_mb:.0f} MB)"
    )
    return 0


# -- augment-preview -------------------------------------------------------------------------


def augment_preview_parser(p: argparse.ArgumentParser) -> None:
    from convforge.builder.data.augment import AugmentConfig
    from convforge.builder.training.config import TrainConfig

    p.description = (
        "Write a PNG grid: each row one training image, first its evaluation "
        "view, then random augmented views with the chosen preset and overrides."
    )
    add_settings(p, TrainConfig, "data", only=("dataset", "input_size", "seed"))
    add_settings(p, AugmentConfig, "augmentation (unset: the preset's value)")
    g = p.add_argument_group("grid")
    g.add_argument("--samples", type=int, default=8, help="rows (8)")
    g.add_argument("--variants", type=int, default=7, help="augmented views per row (7)")
    g.add_argument("--out", default="runs/augment-preview.png", help="PNG path")
    p.set_defaults(func=cmd_augment_preview)


def cmd_augment_preview(args) -> int:
    from convforge.builder.data.augment import AugmentConfig
    from convforge.builder.data.images import channel_stats
    from convforge.builder.data.preview import preview_grid
    from convforge.builder.data.sources import load_dataset
    from convforge.files import together

    bundle = load_dataset(args.dataset, seed=args.seed)
    aug = settings_from(AugmentConfig, args).resolved(flip_safe=bundle.flip_safe)
    stats = channel_stats(bundle.train, seed=args.seed)
    path = Path(args.out)
    with together() as staging:
        if not path.parent.is_dir():
            staging.folder(path.parent)  # a new folder appears only with the grid in it
        preview_grid(
            bundle.train,
            aug,
            args.input_size,
            stats.mean,
            stats.std,
            bundle.native_size,
            staging.file(path),
            samples=args.samples,
            variants=args.variants,
            seed=args.seed,
        )
    print(
        f"{path}: {args.samples} {bundle.name} images x {args.variants} augmented views "
        f"(preset {args.preset}; first column: the evaluation view)"
    )
    return 0


PARSERS = {
    "models": models_parser,
    "diagnose": diagnose_parser,
    "train": train_parser,
    "finetune": finetune_parser,
    "compress": compress_parser,
    "augment-preview": augment_preview_parser,
}
