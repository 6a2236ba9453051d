"""The lecture's weight-initialization experiment: activation statistics by depth.

Push one batch of unit-Gaussian inputs through a freshly initialized model and
record the mean and standard deviation of every activation layer's output, in
forward order. Too small an init shrinks the std layer by layer toward zero;
Kaiming (ReLU) and Xavier (tanh) keep it about constant. Norm layers use the
batch's own statistics (as in a first training step) and dropout is off, so
the numbers show what the weights alone do to the signal.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from convforge.builder.layers import ACTIVATION_TYPES
from convforge.builder.registry import ModelConfig, build_model
from convforge.console import format_table
from convforge.errors import UserError, check_int, first_line
from convforge.plots import pyplot, save_png


@dataclass(frozen=True)
class LayerStats:
    layer: str  # the activation module's name in the model
    mean: float
    std: float


@dataclass(frozen=True)
class InitRun:
    """Per-layer statistics of one model under one init rule."""

    config: ModelConfig  # resolved: init and norm filled in
    layers: list[LayerStats]

    @property
    def depth_ratio(self) -> float:
        """std of the deepest activation layer / std of the first (1.0 = no drift)."""
        first = self.layers[0].std
        return self.layers[-1].std / first if first > 0 else float("nan")


def activation_stats(model: nn.Module, x: torch.Tensor) -> list[LayerStats]:
    """Run ``x`` through ``model`` and return each activation module's output statistics.

    A module called more than once appears once per call, suffixed ``#2``, ``#3``.
    """
    stats: list[LayerStats] = []
    calls: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            label = name if calls[name] == 1 else f"{name}#{calls[name]}"
            out = output.detach().double()
            stats.append(LayerStats(label, out.mean().item(), out.std().item()))

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, ACTIVATION_TYPES)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if not stats:
        raise UserError("the model has no activation layers to measure")
    return stats


def run_init_experiment(
    config: ModelConfig,
    inits: list[str],
    input_size: int = 32,
    batch_size: int = 32,
    seed: int = 0,
) -> list[InitRun]:
    """Measure ``config``'s model once per init rule in ``inits``, same inputs for all."""
    check_int("batch size (batch statistics)", batch_size, minimum=2)
    check_int("input size (px)", input_size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, config.in_channels, input_size, input_size, generator=gen)
    runs = []
    for init in inits:
        cfg = dataclasses.replace(config, init=init).resolved()
        torch.manual_seed(seed)
        model = build_model(cfg).train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        try:
            layers = activation_stats(model, x)
        except (RuntimeError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(
                f"{cfg.arch} with stem {cfg.stem!r} cannot take {input_size} px input: "
                f"{first_line(e)}"
            ) from None
        runs.append(InitRun(cfg, layers))
    return runs


def ratio_spread(
    config: ModelConfig,
    inits: list[str],
    seeds,
    input_size: int = 32,
    batch_size: int = 32,
) -> dict[str, dict[str, float]]:
    """Per init rule: the median, min and max of :attr:`InitRun.depth_ratio` over ``seeds``.

    One seed is one draw of weights and inputs, and the ratio of a narrow,
    deep, unnormalized ReLU net varies a lot between draws (kaiming on the
    default plain net: 0.42 to 1.09 over seeds 0-9), so a single seed's ratio
    says little on its own. Even the model's head size moves it, since the
    head is built, and draws from the generator, before the weights are
    initialized.
    """
    ratios: dict[str, list[float]] = {init: [] for init in inits}
    for seed in seeds:
        for run in run_init_experiment(config, inits, input_size, batch_size, seed):
            ratios[run.config.init].append(run.depth_ratio)
    return {
        init: {"median": float(np.median(v)), "min": min(v), "max": max(v), "seeds": len(v)}
        for init, v in ratios.items()
    }


def format_spread(spread: dict[str, dict[str, float]]) -> str:
    """One line: each init's median depth ratio and its range over the seeds."""
    seeds = next(iter(spread.values()))["seeds"]
    return f"over {seeds} seeds, median (min-max): " + ", ".join(
        f"{init} {s['median']:.3g} ({s['min']:.3g}-{s['max']:.3g})" for init, s in spread.items()
    )


def plot_init_experiment(runs: list[InitRun], path) -> None:
    """Write a PNG: std (log scale) and mean of each activation layer, one line per init."""
    plt = pyplot()

    cfg = runs[0].config
    fig, (ax_std, ax_mean) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        depth = range(1, len(run.layers) + 1)
        stds = [max(s.std, 1e-30) for s in run.layers]
        ax_std.plot(depth, stds, marker="o", ms=3, label=run.config.init)
        ax_mean.plot(depth, [s.mean for s in run.layers], marker="o", ms=3, label=run.config.init)
    ax_std.set_yscale("log")
    ax_std.set(xlabel="activation layer", ylabel="std of activations", title="std by depth")
    ax_mean.set(xlabel="activation layer", ylabel="mean of activations", title="mean by depth")
    for ax in (ax_std, ax_mean):
        ax.grid(True, alpha=0.3)
        ax.legend(title="init")
    opts = "".join(f", {k}={v}" for k, v in cfg.options.items())
    fig.suptitle(f"{cfg.arch}{opts}: activation={cfg.activation}, norm={cfg.norm}")
    save_png(fig, path, dpi=110)


def as_record(runs: list[InitRun]) -> dict:
    """JSON-ready summary: the shared config, then per init the layer table and depth ratio."""
    base = dataclasses.asdict(runs[0].config)
    base.pop("init")
    return {
        "config": base,
        "runs": [
            {
                "init": run.config.init,
                "first_std": run.layers[0].std,
                "last_std": run.layers[-1].std,
                "depth_ratio": run.depth_ratio,
                "layers": [dataclasses.asdict(s) for s in run.layers],
            }
            for run in runs
        ],
    }


def format_runs(runs: list[InitRun]) -> str:
    """Terminal table: per-layer mean/std, one column pair per init, then the depth ratios."""
    headers = ["#", "layer"]
    for run in runs:
        headers += [f"{run.config.init} mean", f"{run.config.init} std"]
    rows = []
    for i, layer in enumerate(runs[0].layers):
        row: list[object] = [i + 1, layer.layer]
        for run in runs:
            row += [run.layers[i].mean, run.layers[i].std]
        rows.append(row)
    cfg = runs[0].config
    ratios = ", ".join(f"{r.config.init} {r.depth_ratio:.3g}" for r in runs)
    return (
        f"{cfg.arch}, activation {cfg.activation}, norm {cfg.norm}\n"
        f"{format_table(headers, rows)}\n"
        f"std of last layer / first layer: {ratios}"
    )
