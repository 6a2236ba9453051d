"""The runtime's commands: ``inspect``, ``annotate``, ``predict``, ``bench``, ``backends`` and
``serve``. None imports torch
unless asked to (``--backend torch``, ``bench --accuracy``). ``bench``'s timing options
are generated from ``BenchConfig``; the matrix itself is
:func:`convforge.runtime.bench.bench_matrix`. ``backends`` lists each backend's option
schema and whether it can run here."""

from __future__ import annotations

import argparse
import json

from convforge import extras
from convforge.cli.arguments import (
    add_backend_options,
    add_json,
    add_model_overrides,
    add_settings,
    backend_options,
    csv,
    model_overrides,
    settings_from,
)
from convforge.cli.plan import (
    FORCE_PLAN_HELP,
    PLAN_HELP,
    bench_with_plan,
    serve_with_plan,
    use_plan,
)
from convforge.errors import UserError
from convforge.runtime.backends import AUTO_ORDER

BACKEND_HELP = f"auto, {', '.join(AUTO_ORDER[:-1])} or {AUTO_ORDER[-1]}"
OPTIONS_HINT = "`convforge backends` lists each backend's options and whether it runs here."


def predict_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Classify images with an exported model (.onnx; .pt2 for the torch "
        "backend). Preprocessing comes from the model's metadata. --backend auto loads "
        f"the fastest backend that can run the file here ({', '.join(AUTO_ORDER)}, in that "
        f"order). {OPTIONS_HINT}"
    )
    p.add_argument("model", help="an .onnx file (or a convforge .pt2)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--backend", default="auto", help=f"{BACKEND_HELP} (default: auto)")
    add_backend_options(p, "torch.device=cuda")
    p.add_argument("--plan", help=PLAN_HELP + " (the entry closest to the number of images)")
    p.add_argument("--force-plan", action="store_true", help=FORCE_PLAN_HELP)
    add_model_overrides(p)
    p.add_argument(
        "-v", "--verbose", action="store_true", help="say which backends auto skipped, and why"
    )
    add_json(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args) -> int:
    from convforge.runtime import load, load_plan
    from convforge.runtime.backends import BACKENDS

    if args.backend == "auto":
        extras.require_engine("convforge predict")
    overrides = model_overrides(args)
    options = backend_options(args.set, BACKENDS)
    if args.plan:
        conflicts = {"--backend": args.backend != "auto", "--set": bool(args.set)}
        plan = use_plan(args.plan, [args.model], conflicts, force=args.force_plan)
        opened = load_plan(plan, min(len(args.images), 32), check=False, overrides=overrides)
    else:
        opened = load(args.model, backend=args.backend, overrides=overrides,
                      **options.get(args.backend, {}))  # fmt: skip
    with opened as model:
        results = model.predict(args.images, topk=args.topk)
        ran = model.backend.describe()
        skipped = model.skipped
    if args.json:
        record = {
            "model": args.model,
            **ran,
            "skipped": skipped,
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
    if args.verbose:
        for s in skipped:
            print(f"auto skipped {s['backend']}: {s['why']}")
    return 0


def bench_parser(p: argparse.ArgumentParser) -> None:
    from convforge.runtime.bench import BenchConfig

    p.description = (
        "Benchmark exported models: per backend and batch size, load time and "
        "first inference apart, warm-up, then timed runs; latency mean/std/min/p50/p90/p95/"
        "p99/max and images/s, end to end (and compute-only where inputs can stay on the "
        f"GPU). Exits 1 when --compare finds a regression. A file that is not an image "
        f"classifier (detection, segmentation, several inputs) is timed on random inputs of "
        f"its declared types and shapes, dynamic dims set by --shapes. {OPTIONS_HINT}"
    )
    p.add_argument("models", nargs="+", help=".onnx files (e.g. fp32, fp16, int8), any model")
    p.add_argument(
        "--shapes",
        help="input shapes of a model that is not an image classifier, trtexec's syntax: "
        "NAME:1x3x640x640,NAME2:1x10 (needed for its dynamic dims)",
    )
    p.add_argument(
        "--backends",
        default="available",
        help="comma-separated backends, or 'available' (every one that runs here)",
    )
    add_settings(p, BenchConfig, "timing")
    g = p.add_argument_group("accuracy and regressions")
    g.add_argument(
        "--accuracy", help="dataset spec: add each backend's top-1 on its val split (needs torch)"
    )
    g.add_argument("--compare", help="baseline bench JSON: flag slower p50s")
    g.add_argument(
        "--plan", help=PLAN_HELP + ": the entry closest to each batch size (default: the plan's)"
    )
    g.add_argument("--force-plan", action="store_true", help=FORCE_PLAN_HELP)
    g.add_argument(
        "--threshold",
        type=float,
        default=0.10,
        help="--compare: slowdown that counts as a regression (default: 0.10 = 10%%)",
    )
    add_backend_options(
        p, "torch.device=cuda, torch.dtype=fp16, ort-cpu.threads=2, openvino.hint=THROUGHPUT"
    )
    g = p.add_argument_group("output")
    g.add_argument("--json-out", help="write records as JSON")
    g.add_argument("--csv-out", help="write records as CSV")
    g.add_argument("--plot", help="write a PNG: latency and throughput vs batch size")
    add_model_overrides(p)
    add_json(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from convforge.runtime import bench
    from convforge.runtime.any_graph import parse_shapes
    from convforge.runtime.backends import BACKENDS
    from convforge.runtime.environment import environment

    if args.plot:
        extras.require("convforge bench --plot", "matplotlib")
    names = None if args.backends == "available" else csv(args.backends)
    if names is None:
        extras.require_engine("convforge bench")
    cfg = settings_from(bench.BenchConfig, args)
    overrides = model_overrides(args)
    options = backend_options(args.set, BACKENDS)
    labelled = None
    if args.accuracy:
        labelled = _labelled_images(args.accuracy, args.models[0], overrides=overrides)
    if args.plan:
        records, skipped = bench_with_plan(args, cfg, labelled, overrides), []
    else:
        shapes = parse_shapes(args.shapes)
        records, skipped = bench.bench_matrix(
            args.models, names, cfg, options, labelled, shapes=shapes, overrides=overrides
        )
    env = environment()
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
        result = {"environment": env, "records": records, "regressions": regressions}
        print(json.dumps({**result, "skipped": skipped}, indent=2))
        return 1 if regressions else 0
    print(bench.format_table(records))
    if labelled is not None:
        for r in records:
            if (
                "top1_accuracy" in r
                and r["timing"] == "end-to-end"
                and (r["batch_size"] == cfg.batch_sizes[0])
            ):
                print(f"top-1 accuracy {r['backend']} {r['precision']}: {r['top1_accuracy']:.2%}")
    gpu = f", {env['gpu']}" if "gpu" in env else ""
    print(f"\n{env['cpu']}, {env['logical_cores']} logical cores{gpu}")
    for note in skipped:
        print(f"skipped: {note}")
    if any(r["unstable"] for r in records):
        print("warning: some runs varied by more than 10% (cv); close other programs")
    for reg in regressions:
        print(
            f"REGRESSION: {reg['backend']} {reg['precision']} batch {reg['batch_size']}: "
            f"p50 {reg['p50_ms']:.3f} ms vs {reg['baseline_p50_ms']:.3f} ms "
            f"(x{reg['slowdown']:.2f})"
        )
    return 1 if regressions else 0


def _labelled_images(
    spec: str, model_path: str, what: str = "convforge bench --accuracy", overrides=None, **split
):
    """Raw validation images (uint8 HxW[xC]) and labels of dataset ``spec`` for ``what``
    (--accuracy, tune), checked against the classes of ``model_path`` as ``overrides``
    (``--labels``) make them.

    ``split``: ``val_fraction`` and ``seed`` of the validation split (the
    builder's defaults otherwise). The datasets are the builder's, so this
    needs the train extra.
    """
    extras.require(what, "torch", "torchvision", "sklearn")
    from convforge.builder.data.sources import load_dataset
    from convforge.contract import read_info

    info = read_info(model_path, overrides)
    bundle = load_dataset(spec, channels=info.spec.channels, **split)
    if list(bundle.classes) != list(info.classes):
        raise UserError(
            f"dataset {spec!r} has classes {bundle.classes[:5]}..., the model "
            f"{info.classes[:5]}...; {what} needs the model's own classes"
        )
    images = []
    for i in range(len(bundle.val)):
        x = bundle.val.load(i).numpy()
        images.append(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0))
    return images, list(bundle.val.targets)


def backends_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "First the GPU stack found here (NVIDIA driver, CUDA runtime, cuDNN, TensorRT, "
        "onnxruntime's build, cuda-python: each version with where it was read, or why it "
        "was not found, and any mismatch between them); then every backend: whether it can "
        "run on this machine (and if not, why), and its options with their types, defaults "
        "and meaning, as given to --set BACKEND.KEY=VALUE. --json: {gpu_stack, backends}."
    )
    add_json(p)
    p.set_defaults(func=cmd_backends)


def cmd_backends(args) -> int:
    from convforge.runtime import gpu_stack
    from convforge.runtime.backends import BACKENDS, backend_class
    from convforge.runtime.backends.options import option_rows

    stack = gpu_stack.report()
    records = []
    for name in BACKENDS:
        cls = backend_class(name)
        ok, why = cls.available()
        records.append(
            {"backend": name, "available": ok, "why": why, "options": option_rows(cls.Options)}
        )
    if args.json:
        print(json.dumps({"gpu_stack": stack.as_dict(), "backends": records}, indent=2))
        return 0
    print("GPU stack:")
    for line in stack.lines():
        print(f"  {line}")
    print()
    for r in records:
        state = "available" if r["available"] else f"not available: {r['why']}"
        print(f"{r['backend']} ({state})")
        for o in r["options"]:
            default = "unset" if o["default"] is None else o["default"]
            print(f"  {o['name']} ({o['type']}, default {default}): {o['help']}")
    return 0


def serve_parser(p: argparse.ArgumentParser) -> None:
    from convforge.runtime.serve.batcher import BatchingConfig
    from convforge.runtime.serve.server import ServeConfig

    p.description = (
        "Serve exported models over the Open Inference Protocol (KServe v2), HTTP and gRPC, "
        "with dynamic batching, health, Prometheus metrics and an image classify endpoint. "
        "Ready once every model is loaded and warmed up; SIGTERM or Ctrl-C drains requests "
        f"in flight, then stops. Binds 127.0.0.1 unless --host says otherwise. {OPTIONS_HINT}"
    )
    p.add_argument(
        "models", nargs="+", metavar="[NAME=]MODEL.onnx", help="models, named by file stem or NAME"
    )
    add_settings(p, ServeConfig, "server")
    add_settings(p, BatchingConfig, "batching")
    add_backend_options(p, "ort-cpu.threads=2")
    p.add_argument("--plan", help=PLAN_HELP + " (the entry closest to --max-batch-size)")
    p.add_argument("--force-plan", action="store_true", help=FORCE_PLAN_HELP)
    add_model_overrides(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import asyncio

    from convforge.runtime.serve.server import serve

    if args.backend == "auto":
        extras.require_engine("convforge serve")
    asyncio.run(serve(serve_config(args), on_ready=_announce))
    print("convforge serve: stopped", flush=True)
    return 0


def serve_config(args):
    """The ServeConfig that ``convforge serve`` runs for ``args`` (with --plan: the plan's)."""
    from convforge.runtime.backends import BACKENDS
    from convforge.runtime.serve.batcher import BatchingConfig
    from convforge.runtime.serve.server import ServeConfig

    options = backend_options(args.set, BACKENDS)
    models = model_names(args.models)
    batching = settings_from(BatchingConfig, args).check()
    overrides = model_overrides(args)
    if args.plan:
        return serve_with_plan(args, models, batching, overrides)
    return settings_from(ServeConfig, args, models=models, options=options.get(args.backend, {}),
                         batching=batching, overrides=overrides)  # fmt: skip


def model_names(items: list[str]) -> dict[str, str]:
    """``["a.onnx", "b=x/b.onnx"]`` -> ``{"a": "a.onnx", "b": "x/b.onnx"}``; UserError for
    a duplicate or a name a URL cannot carry."""
    import re
    from pathlib import Path

    models: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq:
            name, path = Path(item).stem, item
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise UserError(f"model name {name!r} must be letters, digits, '_', '.' or '-'")
        if name in models:
            raise UserError(f"two models are named {name!r}; name them with NAME=MODEL.onnx")
        models[name] = path
    return models


def _announce(running) -> None:
    for model in running.models:
        ran = model.describe()
        batching = model.batching
        print(
            f"convforge serve: {model.name} ({model.path}) on {ran['backend']}, "
            f"{ran['precision']}, batches of up to {batching.max_batch_size} rows within "
            f"{batching.max_queue_delay_ms:g} ms, {batching.instances} instance(s): "
            f"{running.http_url}/v2/models/{model.name}",
            flush=True,
        )
    grpc = f", gRPC {running.grpc_address}" if running.grpc_address else ""
    print(f"convforge serve: ready on {running.http_url}{grpc} (Ctrl-C stops)", flush=True)


def inspect_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Print an ONNX model's opset, IR version, inputs and outputs, op "
        "histogram, parameter count, file size, precision, convforge metadata and "
        "BatchNorm count."
    )
    p.add_argument("model", help="an .onnx file")
    add_json(p)
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from convforge.runtime.onnx_info import describe, format_description

    info = describe(args.model)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def annotate_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Write convforge metadata (labels, mean/std, resize, layout, the output to read) into "
        "an ONNX file made elsewhere, so predict, serve, bench and tune run it with the right "
        "preprocessing and labels. Nothing else in the file changes; the written file is "
        "checked to give the same logits as the original before it is saved. Values not "
        "given are the defaults a file without metadata runs with (ImageNet mean/std, "
        "resize to input / 0.875), written out."
    )
    p.add_argument("model", help="an .onnx file")
    p.add_argument("-o", "--out", required=True, help="the annotated .onnx to write")
    add_model_overrides(p, ("--output",), "metadata to write (not given: the file's own, else "
                        "the defaults a file without metadata runs with)")  # fmt: skip
    add_json(p)
    p.set_defaults(func=cmd_annotate)


def cmd_annotate(args) -> int:
    from convforge import extras
    from convforge.runtime.annotate import annotate

    extras.require_engine("convforge annotate")
    done = annotate(args.model, args.out, model_overrides(args))
    if args.json:
        print(json.dumps(done, indent=2))
        return 0
    meta, checked = done["metadata"], done["checked"]
    classes = f"{len(meta['classes'])} labels" if "classes" in meta else "index labels"
    print(
        f"wrote {done['path']}: {classes}, mean {meta['mean']}, std {meta['std']}, resize "
        f"{meta['resize_size']} + crop {meta['input_size']}, {meta['layout']}, output "
        f"{meta['output']!r}; logits identical to {args.model} on {checked['backend']}"
    )
    return 0


PARSERS = {
    "inspect": inspect_parser,
    "annotate": annotate_parser,
    "predict": predict_parser,
    "bench": bench_parser,
    "backends": backends_parser,
    "serve": serve_parser,
}
