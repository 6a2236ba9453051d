"""``convforge <command>``: parses arguments and calls the parts; no logic of its own.

Every command exits 0 on success, 2 with one line ``convforge: error: ...``
on a user mistake (no traceback), and 130 when interrupted. ``--json`` prints
a machine-readable result on stdout instead of the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convforge import __version__
from convforge.errors import UserError


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _add_model_args(
    p: argparse.ArgumentParser, *, model: str, stem: str, norm: str | None, shape: bool = True
) -> None:
    """The ModelConfig fields as options; ``shape``: also --in-channels / --num-classes
    (training takes those from the data instead)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=model, help=f"architecture name (default: {model})")
    g.add_argument("--stem", default=stem, help=f"imagenet (~224 px) or small (8-64 px) ({stem})")
    g.add_argument(
        "--activation",
        default="relu",
        help="relu, leaky_relu, tanh, sigmoid, gelu or silu (default: relu)",
    )
    g.add_argument("--leaky-slope", type=float, default=0.01, help="Leaky ReLU slope for x<0")
    g.add_argument(
        "--norm",
        default=norm,
        help=f"batch, group, layer, instance or none (default: {norm or 'the model default'})",
    )
    g.add_argument("--num-groups", type=int, default=32, help="groups for --norm group")
    if shape:
        g.add_argument("--in-channels", type=int, default=3, help="input channels (1 = grayscale)")
        g.add_argument("--num-classes", type=int, default=1000, help="output classes")
    g.add_argument("--depth", type=int, help="plain net only: number of conv layers (10)")
    g.add_argument("--width", type=int, help="plain net only: channels per layer (64)")
    g.add_argument(
        "--base-width",
        type=int,
        help="ResNet only: first stage's width (64; train: 16 with the small stem)",
    )


def _model_config(args, init: str | None = None):
    from convforge.builder import ModelConfig

    options = {
        k: getattr(args, k)
        for k in ("depth", "width", "base_width")
        if getattr(args, k) is not None
    }
    return ModelConfig(
        args.model,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        stem=args.stem,
        activation=args.activation,
        leaky_slope=args.leaky_slope,
        norm=args.norm,
        num_groups=args.num_groups,
        init=init,
        options=options,
    )


def cmd_models(args) -> int:
    from tqdm import tqdm

    from convforge.builder import ModelConfig, list_models
    from convforge.builder.complexity import as_record, format_records, measure

    names = list_models()
    records = []
    # disable=None shows the bar only on a terminal.
    bar = tqdm(names, desc="measuring", unit="model", leave=False, disable=args.json or None)
    for name in bar:
        cfg = ModelConfig(
            name, num_classes=args.num_classes, in_channels=args.in_channels, stem=args.stem
        )
        records.append(as_record(cfg, measure(cfg, args.input_size)))
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(format_records(records))
    return 0


def cmd_diagnose_init(args) -> int:
    from convforge.builder.diagnose_init import (
        as_record,
        format_runs,
        plot_init_experiment,
        run_init_experiment,
    )
    from convforge.files import ensure_dir, write_text

    inits = _csv(args.init)
    if not inits:
        raise UserError("--init needs at least one of: small, xavier, kaiming")
    runs = run_init_experiment(
        _model_config(args), inits, args.input_size, args.batch_size, args.seed
    )
    cfg = runs[0].config
    out = ensure_dir(args.out)
    stem = f"init-{cfg.arch}-{cfg.activation}-{cfg.norm}"
    plot_init_experiment(runs, out / f"{stem}.png")
    record = as_record(runs)
    record["plot"] = str(out / f"{stem}.png")
    write_text(out / f"{stem}.json", json.dumps(record, indent=2) + "\n")
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(format_runs(runs))
    print(f"\nplot: {out / f'{stem}.png'}\njson: {out / f'{stem}.json'}")
    return 0


def _add_train_args(p: argparse.ArgumentParser, out: str) -> None:
    """TrainConfig and AugmentConfig fields as options (defaults: the digits recipe)."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="digits",
        help="digits (default), synthetic[:classes=N,size=PX,...], imagefolder:DIR, "
        "cifar10:DIR, cifar100:DIR, mnist:DIR, fashion-mnist:DIR (local files only)",
    )
    g.add_argument("--input-size", type=int, default=32, help="square side in px (32)")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="held-out fraction when the data has no validation part (0.1)",
    )
    _add_augment_args(p)
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=15, help="passes over the training split (15)")
    g.add_argument("--batch-size", type=int, default=64, help="images per step per process (64)")
    g.add_argument("--optimizer", default="sgd", help="sgd (momentum, Nesterov) or adamw")
    g.add_argument(
        "--lr",
        type=float,
        help="peak LR (default: 0.4 x batch/256 sgd, 1e-3 adamw; finetune: a tenth)",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    g.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Nesterov momentum for SGD (on)",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        help="on conv/linear weights only (default: 5e-4 sgd, 0.05 adamw)",
    )
    g.add_argument("--schedule", default="cosine", help="cosine (default), step or onecycle")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear LR warmup (1)")
    g.add_argument("--step-epochs", type=int, default=30, help="step schedule: epochs per step")
    g.add_argument("--step-gamma", type=float, default=0.1, help="step schedule: LR factor")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="(0.1)")
    g.add_argument("--clip-grad-norm", type=float, default=0.0, help="max grad norm (0 = off)")
    g.add_argument("--amp", default="off", help="mixed precision: off, auto, bf16, fp16 (CUDA)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    g.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="EMA of weights, evaluated separately (e.g. 0.999; 0 = off)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--workers", type=int, default=0, help="data-loading processes (0)")
    g.add_argument("--seed", type=int, default=0, help="seed for split, init, order, augmentation")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels only")
    g.add_argument(
        "--patience",
        type=int,
        default=0,
        help="stop after N epochs without better val accuracy (0 = never)",
    )
    g.add_argument(
        "--overfit-window",
        type=int,
        default=3,
        help="warn after N epochs of rising val loss and falling train loss (3)",
    )
    g.add_argument("--out", default=out, help=f"run folder ({out})")
    g.add_argument(
        "--resume",
        help="continue the run in this last.pt exactly (other options "
        "are taken from the checkpoint)",
    )
    g.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_augment_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("augmentation (training only; None = the preset's value)")
    g.add_argument("--augment", default="standard", help="preset: none, light, standard, strong")
    g.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="horizontal flips (default: preset's, never for digits/mnist)",
    )
    g.add_argument(
        "--crop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop (pad+crop small images, RandomResizedCrop large ones)",
    )
    g.add_argument("--scale-min", type=float, help="RandomResizedCrop's smallest area fraction")
    g.add_argument("--rotation", type=float, help="max rotation in degrees (0 = off)")
    g.add_argument("--color-jitter", type=float, help="brightness/contrast/saturation strength")
    g.add_argument("--auto-augment", help="none, autoaugment, randaugment, trivialaugment")
    g.add_argument("--erasing", type=float, help="random erasing (cutout) probability")
    g.add_argument("--mixup", type=float, help="Mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, help="CutMix alpha (0 = off)")


def _augment_config(args):
    from convforge.builder.data.augment import AugmentConfig

    return AugmentConfig(
        preset=args.augment,
        flip=args.flip,
        crop=args.crop,
        scale_min=args.scale_min,
        rotation=args.rotation,
        color_jitter=args.color_jitter,
        auto=args.auto_augment,
        erasing=args.erasing,
        mixup=args.mixup,
        cutmix=args.cutmix,
    )


def _train_config(args):
    from convforge.builder.training.config import TrainConfig

    fields = (
        "dataset",
        "input_size",
        "val_fraction",
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "momentum",
        "nesterov",
        "weight_decay",
        "schedule",
        "warmup_epochs",
        "step_epochs",
        "step_gamma",
        "label_smoothing",
        "clip_grad_norm",
        "amp",
        "channels_last",
        "ema_decay",
        "device",
        "workers",
        "seed",
        "deterministic",
        "patience",
        "overfit_window",
        "out",
    )
    return TrainConfig(augment=_augment_config(args), **{f: getattr(args, f) for f in fields})


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


def cmd_train(args) -> int:
    from convforge.builder.training.config import recipe_model
    from convforge.builder.training.trainer import train

    options = {k: getattr(args, k) for k in ("depth", "width", "base_width") if getattr(args, k)}
    model_cfg = recipe_model(
        args.model,
        args.input_size,
        stem=args.stem,
        activation=args.activation,
        leaky_slope=args.leaky_slope,
        norm=args.norm,
        num_groups=args.num_groups,
        init=args.init,
        zero_init_residual=args.zero_init_residual,
        options=options,
    )
    result = train(model_cfg, _train_config(args), resume=args.resume, progress=not args.json)
    _print_result(args, result)
    return 0


def cmd_finetune(args) -> int:
    from convforge.builder.finetune import FinetuneOptions, finetune
    from convforge.builder.training.trainer import train

    if args.resume:
        result = train(None, None, resume=args.resume, progress=not args.json)
    else:
        if not args.pretrained:
            raise UserError("finetune needs --pretrained FILE (or --resume last.pt)")
        opts = FinetuneOptions(
            args.pretrained,
            args.model,
            args.strategy,
            args.freeze_until,
            args.backbone_lr_mult,
            args.unfreeze_at,
        )
        log = (lambda *a: None) if args.json else print
        result = finetune(opts, _train_config(args), log=log)
    _print_result(args, result)
    return 0


def cmd_augment_preview(args) -> int:
    from convforge.builder.data.images import channel_stats
    from convforge.builder.data.preview import preview_grid
    from convforge.builder.data.sources import load_dataset
    from convforge.files import ensure_dir

    bundle = load_dataset(args.dataset, seed=args.seed)
    aug = _augment_config(args).resolved(flip_safe=bundle.flip_safe)
    stats = channel_stats(bundle.train, seed=args.seed)
    path = Path(args.out)
    ensure_dir(path.parent)
    preview_grid(
        bundle.train,
        aug,
        args.input_size,
        stats.mean,
        stats.std,
        bundle.native_size,
        path,
        samples=args.samples,
        variants=args.variants,
        seed=args.seed,
    )
    print(
        f"{path}: {args.samples} {bundle.name} images x {args.variants} augmented views "
        f"(preset {args.augment}; first column: the evaluation view)"
    )
    return 0


def cmd_export(args) -> int:
    from convforge.export import ExportOptions, export_checkpoint

    opts = ExportOptions(
        opset=args.opset,
        fp16=args.fp16,
        int8=args.int8,
        int8_target=args.int8_target,
        calib_samples=args.calib_samples,
        calib_method=args.calib_method,
        val_samples=args.val_samples,
        triton_repo=args.triton_repo,
        triton_max_batch_size=args.triton_max_batch_size,
    )
    report = export_checkpoint(args.checkpoint, args.output, opts)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.format())
    return 0


def cmd_inspect(args) -> int:
    from convforge.export.onnx_info import describe, format_description

    info = describe(args.model)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def cmd_predict(args) -> int:
    from convforge.runtime import load

    options = _backend_options(args.set)
    name = args.backend
    with load(args.model, backend=name, **options.get(name, {})) as model:
        results = model.predict(args.images, topk=args.topk)
        ran = model.backend.describe()
    if args.json:
        record = {
            "model": args.model,
            **ran,
            "predictions": [
                {"image": str(image), "top": [p.__dict__ for p in top]}
                for image, top in zip(args.images, results, strict=True)
            ],
        }
        print(json.dumps(record, indent=2))
        return 0
    for image, top in zip(args.images, results, strict=True):
        best = ", ".join(f"{p.label} {p.probability:.1%}" for p in top)
        print(f"{image}: {best}")
    print(f"({ran['backend']}, {ran['precision']})")
    return 0


def cmd_bench(args) -> int:
    from convforge.runtime import bench
    from convforge.runtime.backends import BACKENDS, backend_class

    cfg = bench.BenchConfig(
        batch_sizes=tuple(_positive_ints("--batch-sizes", args.batch_sizes)),
        warmup_iters=args.warmup_iters,
        warmup_seconds=args.warmup_seconds,
        iters=args.iters,
        seconds=args.seconds,
    )
    explicit = args.backends != "available"
    names, skipped = _csv(args.backends), []
    if not explicit:
        names = []
        for name in BACKENDS:
            ok, why = backend_class(name).available()
            (names.append(name) if ok else skipped.append(f"{name} ({why})"))
    options = _backend_options(args.set)
    labelled = _labelled_images(args.accuracy, args.models[0]) if args.accuracy else None
    records = []
    for path in args.models:
        for name in names:
            try:
                rs = bench.bench_backend(name, path, cfg, **options.get(name, {}))
            except UserError as e:
                if explicit:
                    raise
                skipped.append(f"{name} on {path} ({e})")
                continue
            if labelled is not None:
                acc = bench.accuracy(name, path, *labelled)
                rs = [{**r, "top1_accuracy": acc} for r in rs]
            records += [{"model": path, **r} for r in rs]
    if not records:
        raise UserError("no backend could run: " + "; ".join(skipped))
    env = bench.environment()
    regressions = []
    if args.compare:
        regressions = bench.compare(records, bench.read_records(args.compare), args.threshold)
    if args.json_out:
        bench.write_json(args.json_out, records, env)
    if args.csv_out:
        bench.write_csv(args.csv_out, records)
    if args.plot:
        bench.plot(args.plot, records)
    if args.json:
        print(
            json.dumps(
                {
                    "environment": env,
                    "records": records,
                    "regressions": regressions,
                    "skipped": skipped,
                },
                indent=2,
            )
        )
    else:
        print(bench.format_table(records))
        if labelled is not None:
            for r in records:
                if r["timing"] == "end-to-end" and r["batch_size"] == cfg.batch_sizes[0]:
                    print(
                        f"top-1 accuracy {r['backend']} {r['precision']}: {r['top1_accuracy']:.2%}"
                    )
        print(
            f"\n{env['cpu']}, {env['logical_cores']} logical cores"
            + (f", {env['gpu']}" if "gpu" in env else "")
        )
        for note in skipped:
            print(f"skipped: {note}")
        if any(r["unstable"] for r in records):
            print(
                "warning: some runs varied by more than 10% (cv); "
                "close other programs or raise --seconds"
            )
        for reg in regressions:
            print(
                f"REGRESSION: {reg['backend']} {reg['precision']} batch {reg['batch_size']}: "
                f"p50 {reg['p50_ms']:.3f} ms vs {reg['baseline_p50_ms']:.3f} ms "
                f"(x{reg['slowdown']:.2f})"
            )
    return 1 if regressions else 0


def _backend_options(items: list[str] | None) -> dict[str, dict]:
    """``["torch.device=cuda", "ort-cpu.threads=2"]`` -> ``{"torch": {"device": "cuda"}, ...}``.

    Values are JSON when they parse (numbers, true/false), else strings.
    """
    from convforge.runtime.backends import BACKENDS

    options: dict[str, dict] = {}
    for item in items or []:
        name, dot, rest = item.partition(".")
        key, eq, value = rest.partition("=")
        if not dot or not eq or not key:
            raise UserError(f"--set takes BACKEND.KEY=VALUE (e.g. torch.device=cuda), got {item!r}")
        if name not in BACKENDS:
            raise UserError(
                f"--set {item!r}: unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}"
            )
        try:
            options.setdefault(name, {})[key] = json.loads(value)
        except json.JSONDecodeError:
            options.setdefault(name, {})[key] = value
    return options


def _positive_ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in _csv(text)]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} takes comma-separated positive integers, got {text!r}")
    return values


def _labelled_images(spec: str, model_path: str):
    """Raw validation images (uint8 HxW[xC]) and labels of dataset ``spec`` for --accuracy."""
    from convforge.builder.data.sources import load_dataset
    from convforge.runtime.artifact import read_info

    info = read_info(model_path)
    bundle = load_dataset(spec, channels=info.spec.channels)
    if list(bundle.classes) != list(info.classes):
        raise UserError(
            f"dataset {spec!r} has classes {bundle.classes[:5]}..., the model "
            f"{info.classes[:5]}...; --accuracy needs the model's own classes"
        )
    images = []
    for i in range(len(bundle.val)):
        x = bundle.val.load(i).numpy()
        images.append(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0))
    return images, list(bundle.val.targets)


def cmd_demo(args) -> int:
    from convforge.demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, json_output=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convforge",
        description="Train VGG/ResNet image classifiers, export validated ONNX, "
        "and run them fast with honest latency numbers.",
    )
    parser.add_argument("--version", action="version", version=f"convforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "models",
        help="list every model with parameters and compute",
        description="List every registered model with its parameter count and "
        "compute (GMACs/GFLOPs) for one image at --input-size.",
    )
    p.add_argument("--input-size", type=int, default=224, help="square input side in px (224)")
    p.add_argument("--stem", default="imagenet", help="imagenet or small (default: imagenet)")
    p.add_argument("--in-channels", type=int, default=3, help="input channels (default: 3)")
    p.add_argument("--num-classes", type=int, default=1000, help="output classes (default: 1000)")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "diagnose",
        help="diagnostic experiments (init)",
        description="Diagnostic experiments from the CNN-training lecture.",
    )
    dsub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    p = dsub.add_parser(
        "init",
        help="per-layer activation statistics under each weight init",
        description="The lecture's weight-initialization experiment: push one batch of "
        "unit-Gaussian inputs through a fresh model and report each activation layer's mean "
        "and std, once per init rule, as a table, a PNG plot and JSON. Too small an init "
        "collapses activations toward 0 with depth; kaiming (relu) and xavier (tanh) keep "
        "them steady. Normalization is off by default so only the weights act.",
    )
    _add_model_args(p, model="plain", stem="small", norm="none")
    p.add_argument(
        "--init",
        default="small,xavier,kaiming",
        help="comma-separated init rules to compare (default: small,xavier,kaiming)",
    )
    p.add_argument("--input-size", type=int, default=32, help="square input side in px (32)")
    p.add_argument("--batch-size", type=int, default=32, help="images in the batch (32)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (0)")
    p.add_argument("--out", default="runs/diagnose", help="folder for the PNG and JSON")
    p.add_argument("--json", action="store_true", help="print the JSON record instead of a table")
    p.set_defaults(func=cmd_diagnose_init)

    p = sub.add_parser(
        "train",
        help="train a model (default: small ResNet-18 on scikit-learn's digits)",
        description="Train a model on a dataset with the lecture's techniques. Writes best.pt, "
        "last.pt, metrics.csv, curves.png and config.json to --out. Under torchrun it trains "
        "with DistributedDataParallel (gloo on CPU, nccl on GPU). Small-stem ResNets default "
        "to --base-width 16 (the CIFAR-ResNet widths); --stem auto picks small up to 64 px.",
    )
    _add_model_args(p, model="resnet18", stem="auto", norm=None, shape=False)
    p.add_argument("--init", help="kaiming, xavier or small (default: by activation)")
    p.add_argument(
        "--zero-init-residual", action="store_true", help="start residual blocks as identity"
    )
    _add_train_args(p, out="runs/train")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "finetune",
        help="transfer learning from a checkpoint or torchvision weights file",
        description="Fine-tune pretrained weights (a convforge checkpoint or a torchvision "
        "state_dict .pth on disk) on a new dataset: the head is replaced for the new classes. "
        "--strategy auto applies the lecture's rule of thumb: data is 'small' below "
        "500 training images per class, and the domain 'similar' when a linear probe on the "
        "pretrained features beats one on random features by 10 points or more.",
    )
    p.add_argument("--pretrained", help="convforge .pt checkpoint or torchvision .pth file")
    p.add_argument("--model", help="architecture of a bare state_dict file (e.g. resnet18)")
    p.add_argument("--strategy", default="auto", help="auto (default), feature-extract, finetune")
    p.add_argument("--freeze-until", help="finetune: last frozen stage, e.g. stem, layer2")
    p.add_argument(
        "--backbone-lr-mult",
        type=float,
        default=0.1,
        help="LR multiplier of the trainable backbone stages (0.1)",
    )
    p.add_argument(
        "--unfreeze-at",
        type=int,
        default=0,
        help="epoch from which frozen stages train too (0 = never)",
    )
    _add_train_args(p, out="runs/finetune")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "augment-preview",
        help="PNG grid of augmented training samples",
        description="Write a PNG grid: each row one training image, first its evaluation "
        "view, then random augmented views with the chosen preset and overrides.",
    )
    p.add_argument("--dataset", default="digits", help="dataset spec (see train --help)")
    p.add_argument("--input-size", type=int, default=32, help="square side in px (32)")
    _add_augment_args(p)
    p.add_argument("--samples", type=int, default=8, help="rows (8)")
    p.add_argument("--variants", type=int, default=7, help="augmented views per row (7)")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--out", default="runs/augment-preview.png", help="PNG path")
    p.set_defaults(func=cmd_augment_preview)

    p = sub.add_parser(
        "export",
        help="checkpoint -> BatchNorm-folded, validated ONNX (+ fp16/int8, Triton)",
        description="Rebuild the model of a convforge checkpoint, fold its BatchNorm layers "
        "into the convolutions, export ONNX (input 'input' N,C,H,W with a dynamic batch, "
        "output 'logits', preprocessing in the metadata) and a torch.export program (.pt2), "
        "and validate both against the original model in ONNX Runtime (optimizations off and "
        "on, batch 1 and 8) on the checkpoint's validation images. Nothing is written unless "
        "validation passes. A report goes to <output>.export.json.",
    )
    p.add_argument("checkpoint", help="a convforge checkpoint (best.pt / last.pt)")
    p.add_argument("-o", "--output", required=True, help="ONNX path, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18-20 (18)")
    p.add_argument("--fp16", action="store_true", help="also write <name>.fp16.onnx")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write <name>.int8.onnx (QDQ, per-channel, static calibration)",
    )
    p.add_argument(
        "--int8-target",
        default="cpu",
        help="cpu (uint8 activations: fast on x86 VNNI) or tensorrt (symmetric int8)",
    )
    p.add_argument("--calib-samples", type=int, default=256, help="calibration images (256)")
    p.add_argument("--calib-method", default="minmax", help="minmax, entropy or percentile")
    p.add_argument("--val-samples", type=int, default=512, help="validation images, at most")
    p.add_argument("--triton-repo", help="also write a Triton model repository here")
    p.add_argument("--triton-max-batch-size", type=int, default=32, help="(32)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "inspect",
        help="what an ONNX file holds",
        description="Print an ONNX model's opset, IR version, inputs and outputs, op "
        "histogram, parameter count, file size, convforge metadata and BatchNorm count.",
    )
    p.add_argument("model", help="an .onnx file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "predict",
        help="top-k classes of images with an exported model",
        description="Classify images with an exported model (.onnx; .pt2 for the torch "
        "backend). Preprocessing comes from the model's metadata.",
    )
    p.add_argument("model", help="an exported .onnx (or .pt2) file")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--topk", type=int, default=5, help="classes per image (5)")
    p.add_argument(
        "--set",
        action="append",
        metavar="BACKEND.KEY=VALUE",
        help="an option of the named --backend, e.g. torch.device=cuda",
    )
    p.add_argument(
        "--backend",
        default="auto",
        help="auto, ort-cpu, ort-cuda, ort-trt, tensorrt, openvino or torch (auto)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "bench",
        help="latency/throughput per backend x precision x batch size",
        description="Benchmark exported models: per backend and batch size, load time and "
        "first inference apart, warm-up, then timed runs; latency mean/std/min/p50/p90/p95/"
        "p99/max and images/s, end to end (and compute-only where inputs can stay on the "
        "GPU). Exits 1 when --compare finds a regression.",
    )
    p.add_argument("models", nargs="+", help="exported .onnx files (e.g. fp32, fp16, int8)")
    p.add_argument(
        "--backends",
        default="available",
        help="comma-separated backends, or 'available' (every one that runs here)",
    )
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (1,8,32)")
    p.add_argument("--warmup-iters", type=int, default=10, help="warm-up runs, at least (10)")
    p.add_argument("--warmup-seconds", type=float, default=1.0, help="warm-up, at least (1 s)")
    p.add_argument("--iters", type=int, default=50, help="measured runs, at least (50)")
    p.add_argument("--seconds", type=float, default=2.0, help="measured time, at least (2 s)")
    p.add_argument("--accuracy", help="dataset spec: add each backend's top-1 on its val split")
    p.add_argument("--compare", help="baseline bench JSON: flag slower p50s")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.10,
        help="--compare: slowdown that counts as a regression (0.10 = 10%%)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="BACKEND.KEY=VALUE",
        help="a backend option, repeatable: torch.device=cuda, torch.dtype=fp16, "
        "torch.cuda_graphs=true, ort-cpu.threads=2, openvino.hint=THROUGHPUT",
    )
    p.add_argument("--json-out", help="write records as JSON")
    p.add_argument("--csv-out", help="write records as CSV")
    p.add_argument("--plot", help="write a PNG: latency and throughput vs batch size")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the bundled dataset, with a report",
        description="Run the demo pipeline on the bundled dataset and write a "
        "report (report.md, report.json, plots) to --out.",
    )
    p.add_argument("--out", default="runs/demo", help="report folder (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (the recipe's 15)")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``convforge`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"convforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convforge: interrupted", file=sys.stderr)
        return 130
