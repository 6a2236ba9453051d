"""The model zoo: a dict from name to factory, and the one way to build a model.

Architectures register a factory with :func:`register_model` (duplicate names
are refused). :class:`ModelConfig` records every choice that shapes a model;
:func:`build_model` turns it into an initialized ``nn.Module``, and
:func:`create_model` is the same with keywords. A checkpoint stores
``dataclasses.asdict(config.resolved())`` so the model can be rebuilt exactly.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from convforge.builder.initialization import INITS, default_init, init_weights
from convforge.builder.layers import ACTIVATIONS, NORMS, activation_layer, norm_layer
from convforge.builder.widths import apply_widths
from convforge.errors import UserError, check_choice
from convforge.settings import check_ranges, setting

STEMS = ("imagenet", "small")


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture."""

    name: str
    factory: Callable[..., nn.Module]
    default_norm: str  # the norm used when the config leaves it unset
    norms: tuple[str, ...]  # the norms this architecture accepts
    options: dict  # architecture-specific keywords and their defaults (e.g. plain's depth)

    @property
    def summary(self) -> str:
        return (self.factory.__doc__ or "").strip().splitlines()[0]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(fn=None, *, default_norm: str = "batch", norms: tuple[str, ...] = NORMS):
    """Register ``fn`` under its ``__name__``; usable bare or with keywords.

    ``fn(num_classes, in_channels, stem, norm_layer, act_layer, **options)``
    builds the uninitialized model; its own keyword parameters with defaults
    become the architecture's ``options``.
    """

    def add(fn):
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        options = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.default is not inspect.Parameter.empty
        }
        _REGISTRY[name] = ModelEntry(name, fn, default_norm, tuple(norms), options)
        return fn

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    """Names of every registered model, in natural order (resnet18 before resnet101)."""
    return sorted(
        _REGISTRY, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)]
    )


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; UserError listing the models if unknown."""
    return _REGISTRY[check_choice("model", name, list_models())]


@dataclass
class ModelConfig:
    """Every choice that shapes a model. ``None`` fields take the model's defaults."""

    arch: str = setting(help="architecture name (see `convforge models`)", flag="--model")
    num_classes: int = setting(1000, "outputs of the last layer", minimum=1)
    in_channels: int = setting(3, "input channels (1 = grayscale)", minimum=1)
    stem: str = setting("imagenet", "imagenet for ~224 px inputs, small for 8-64 px", choices=STEMS)
    activation: str = setting(
        "relu", f"used in every layer: {', '.join(ACTIVATIONS)}", choices=ACTIVATIONS
    )
    leaky_slope: float = setting(0.01, "Leaky ReLU's slope for x < 0")
    norm: str | None = setting(
        None,
        f"after each conv: {', '.join(NORMS)}; default: batch (none for plain VGG)",
        choices=NORMS,
    )
    num_groups: int = setting(
        32, "channel groups for --norm group; must divide every width", minimum=1
    )
    init: str | None = setting(
        None,
        f"weight init: {', '.join(INITS)}; default: xavier for tanh/sigmoid, else kaiming",
        choices=INITS,
    )
    zero_init_residual: bool = setting(False, "residual blocks start as identity (last BN scale 0)")
    options: dict = setting(
        factory=dict, help='architecture options, e.g. {"depth": 10}', cli=False
    )
    # A pruned model's layers that differ from the architecture's ({} for every model
    # convforge trains): {name: [out, in]} for convs and linears, {name: [channels]} for
    # norms (builder/widths.py). Written by `convforge compress`.
    widths: dict = setting(factory=dict, help="per-layer widths of a pruned model", cli=False)

    def resolved(self) -> ModelConfig:
        """A copy with defaults filled in and every field checked (UserError if bad)."""
        entry = get_entry(self.arch)
        check_ranges(self)  # choices and ranges declared on the fields; the rest below
        norm = entry.default_norm if self.norm is None else self.norm
        if norm not in entry.norms:
            raise UserError(
                f"model {self.arch!r} takes norm {', '.join(entry.norms)} only, got {norm!r}"
                f" (use {self.arch.removesuffix('_bn')!r} for other norms)"
            )
        init = default_init(self.activation) if self.init is None else self.init
        unknown = sorted(set(self.options) - set(entry.options))
        if unknown:
            takes = ", ".join(entry.options) or "no options"
            raise UserError(
                f"model {self.arch!r} has no option {', '.join(unknown)}; it takes: {takes}"
            )
        if self.zero_init_residual and norm == "none":
            raise UserError(
                "zero_init_residual needs a norm layer whose scale it zeroes; got norm 'none'"
            )
        options = {**entry.options, **self.options}
        if not isinstance(self.widths, dict):
            raise UserError(f"widths must be a mapping of layer name to sizes, got {self.widths!r}")
        return dataclasses.replace(self, norm=norm, init=init, options=options)


def build_model(config: ModelConfig) -> nn.Module:
    """Build and initialize the model ``config`` describes (on the current default device)."""
    cfg = config.resolved()
    model = get_entry(cfg.arch).factory(
        num_classes=cfg.num_classes,
        in_channels=cfg.in_channels,
        stem=cfg.stem,
        norm_layer=norm_layer(cfg.norm, cfg.num_groups),
        act_layer=activation_layer(cfg.activation, cfg.leaky_slope),
        **cfg.options,
    )
    if cfg.widths:
        apply_widths(model, cfg.widths)
    if cfg.zero_init_residual and not any(hasattr(m, "zero_init_last") for m in model.modules()):
        raise UserError(
            f"zero_init_residual applies to residual models; {cfg.arch!r} has no blocks"
        )
    init_weights(model, cfg.init, cfg.activation, cfg.leaky_slope, cfg.zero_init_residual)
    return model


def create_model(
    name: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    stem: str = "imagenet",
    activation: str = "relu",
    norm: str | None = None,
    init: str | None = None,
    leaky_slope: float = 0.01,
    num_groups: int = 32,
    zero_init_residual: bool = False,
    **options,
) -> nn.Module:
    """Build model ``name``; every keyword is the :class:`ModelConfig` field of that name.

    Architecture-specific options (plain's ``depth``, ``width``) pass through
    ``**options``. Raises UserError naming the valid choices for any bad value.
    """
    config = ModelConfig(
        name,
        num_classes=num_classes,
        in_channels=in_channels,
        stem=stem,
        activation=activation,
        leaky_slope=leaky_slope,
        norm=norm,
        num_groups=num_groups,
        init=init,
        zero_init_residual=zero_init_residual,
        options=options,
    )
    return build_model(config)
