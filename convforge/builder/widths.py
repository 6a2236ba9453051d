"""Per-layer widths: what a pruned model records so that ``build_model`` rebuilds its shape.

A structurally pruned network has the architecture's layers with fewer channels.
:func:`layer_widths` reads them off a model (conv and linear ``[out, in]``, norm
``[channels]``, by module name); :func:`changed_widths` keeps those that differ
from the unpruned architecture, which is what ``ModelConfig.widths`` stores; and
:func:`apply_widths` resizes a freshly built model to them, so a checkpoint of a
pruned model loads with ``strict=True`` and export, folding and every backend see
an ordinary model.
"""

from __future__ import annotations

from torch import nn

from convforge.errors import UserError

# The layers pruning resizes; every other module is shape-free (activations, pools).
NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)


def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """Every conv and linear layer's ``[out, in]`` and every norm's ``[channels]``, by name."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            widths[name] = [m.out_channels, m.in_channels]
        elif isinstance(m, nn.Linear):
            widths[name] = [m.out_features, m.in_features]
        elif isinstance(m, nn.GroupNorm):
            widths[name] = [m.num_channels]
        elif isinstance(m, NORMS):
            widths[name] = [m.num_features]
    return widths


def changed_widths(model: nn.Module, reference: nn.Module) -> dict[str, list[int]]:
    """The entries of ``layer_widths(model)`` that differ from ``reference``'s (the same
    architecture unpruned); ValueError if the two do not have the same layers."""
    have, base = layer_widths(model), layer_widths(reference)
    if have.keys() != base.keys():
        raise ValueError("model and reference do not have the same layers")
    return {k: v for k, v in have.items() if v != base[k]}


def apply_widths(model: nn.Module, widths: dict) -> nn.Module:
    """Resize ``model``'s layers named in ``widths`` in place (new, uninitialized weights of
    the recorded sizes; every other setting of the layer kept) and return it. UserError when
    a name is not a conv, linear or norm layer of the model, or a width is not a positive
    integer, or a grouped conv or a group norm cannot take it."""
    modules = dict(model.named_modules())
    for name, sizes in widths.items():
        layer = modules.get(name)
        expected = 1 if isinstance(layer, NORMS) else 2
        if not isinstance(layer, (nn.Conv2d, nn.Linear, *NORMS)):
            raise UserError(f"widths: {name!r} is not a conv, linear or norm layer of the model")
        if (
            not isinstance(sizes, (list, tuple))
            or len(sizes) != expected
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
        ):
            raise UserError(
                f"widths: {name!r} needs {expected} positive integer(s) "
                f"({'[channels]' if expected == 1 else '[out, in]'}), got {sizes!r}"
            )
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, _resized(name, layer, list(sizes)))
    return model


def _resized(name: str, m: nn.Module, sizes: list[int]) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        out_ch, in_ch = sizes
        groups = m.groups
        if groups > 1:
            # Depthwise convs keep one group per channel; other grouped convs keep their count.
            groups = in_ch if m.groups == m.in_channels == m.out_channels else m.groups
            if in_ch % groups or out_ch % groups:
                raise UserError(f"widths: {name!r} has {groups} groups; {sizes} do not divide")
        return nn.Conv2d(
            in_ch, out_ch, m.kernel_size, m.stride, m.padding, m.dilation, groups,
            bias=m.bias is not None, padding_mode=m.padding_mode,
        )  # fmt: skip
    if isinstance(m, nn.Linear):
        return nn.Linear(sizes[1], sizes[0], bias=m.bias is not None)
    (channels,) = sizes
    if isinstance(m, nn.GroupNorm):
        if channels % m.num_groups:
            raise UserError(
                f"widths: {name!r} is a group norm of {m.num_groups} groups; "
                f"{channels} channels do not divide into them"
            )
        return nn.GroupNorm(m.num_groups, channels, m.eps, m.affine)
    return type(m)(channels, m.eps, m.momentum, m.affine, m.track_running_stats)
