"""Fold eval-mode BatchNorm into the conv or linear layer before it.

In eval mode a BatchNorm is a fixed per-channel affine map,
``y = (x - mean) * gamma / sqrt(var + eps) + beta``, and a conv (or linear)
layer is linear in its weights per output channel, so the pair collapses into
one conv with rescaled weights and a new bias: one layer less to run, the same
outputs up to rounding. Two layers, as in ``torch.nn.utils.fusion``:

* :func:`convforge.export.fold_math.fold_weights`: the formula, a pure
  function of tensors, in its own module;
* :func:`fold_batchnorm` (here): the walker. It finds (conv, BN) pairs with
  ``torch.fx`` (falling back to adjacent children of ``nn.Sequential`` when fx
  cannot trace the model), folds those that are safe to fold, keeps the others
  with a reason, and checks the folded model against the original on one batch.

``torch.nn.utils.fusion`` is not used: in torch 2.14 it builds wrong weights
for grouped ``ConvTranspose``. The folded model is for inference only: it has
no BatchNorm left to train, and fx specialises ``self.training`` branches to
eval mode.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from convforge.errors import UserError
from convforge.export.fold_math import fold_weights

__all__ = ["FoldEntry", "FoldReport", "fold_batchnorm"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLD_TARGETS = _CONVS + _CONV_TRANSPOSES + (nn.Linear,)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Spatial size of the default check batch, per number of spatial dimensions.
# 3-D uses 32^3: 64^3 activations of a 3-D net are needlessly large for a check.
_CHECK_SIZE = {0: (), 1: (64,), 2: (64, 64), 3: (32, 32, 32)}


# --------------------------------------------------------------------------- report


@dataclass
class FoldEntry:
    """What happened to one BatchNorm module."""

    bn: str  # qualified name of the BatchNorm module in the original model
    folded_into: str | None  # qualified name of the conv/linear it was folded into, or None
    reason: str | None  # why it was kept (None when folded)


@dataclass
class FoldReport:
    """The outcome of :func:`fold_batchnorm`.

    ``method`` is ``"fx"`` (pairs found in the traced graph) or ``"sequential"``
    (fx could not trace the model; ``trace_error`` says why, in one line).
    The diffs compare the folded model with the original on the check batch,
    over every tensor in the output (a tensor, or tuples/lists/dicts of them):

    * ``max_abs_diff = max |folded - original|``
    * ``max_rel_diff = max_abs_diff / max |original|``: the worst error relative
      to the output's scale (0 when both are 0, ``inf`` when only the output is 0).
      Element-wise relative errors are not used: they blow up at outputs near zero.
    """

    entries: list[FoldEntry]
    method: str
    max_abs_diff: float
    max_rel_diff: float
    trace_error: str | None = field(default=None)

    @property
    def folded(self) -> int:
        return sum(e.folded_into is not None for e in self.entries)

    @property
    def kept(self) -> int:
        return sum(e.folded_into is None for e in self.entries)

    def as_dict(self) -> dict:
        """JSON-ready: plain types only; a non-finite diff becomes None."""

        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "method": self.method,
            "trace_error": self.trace_error,
            "folded": self.folded,
            "kept": self.kept,
            "max_abs_diff": finite(self.max_abs_diff),
            "max_rel_diff": finite(self.max_rel_diff),
            "entries": [asdict(e) for e in self.entries],
        }

    def format(self) -> str:
        """A table (bn, folded into / kept, reason), then the diffs."""
        head = f"BatchNorm folding ({self.method}): {self.folded} folded, {self.kept} kept"
        lines = [head]
        if self.trace_error:
            lines.append(f"fx could not trace the model: {self.trace_error}")
        rows = [("bn", "folded into", "reason")]
        rows += [(e.bn, e.folded_into or "kept", e.reason or "") for e in self.entries]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines += [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
        lines.append(
            f"folded vs original on the check batch: max abs diff {self.max_abs_diff:.3g}, "
            f"max rel diff {self.max_rel_diff:.3g} (relative to max |output|)"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------- walker


def fold_batchnorm(
    module: nn.Module, example: Tensor | None = None
) -> tuple[nn.Module, FoldReport]:
    """Fold every foldable BatchNorm of an eval-mode ``module`` into the layer before it.

    Returns ``(folded, report)``. ``module`` is not modified: a deep copy is folded.
    ``folded`` is in eval mode and is a ``torch.fx.GraphModule`` (or, on the
    fallback, a copy of ``module``'s own class), ready for export.

    A BN is folded when it is a plain ``BatchNorm1d/2d/3d`` with running
    statistics, called once, whose input is the output of a ``Conv1d/2d/3d``,
    ``ConvTranspose1d/2d/3d`` or (BatchNorm1d only, on a 2-D ``[N, C]`` output)
    ``Linear`` module that is called once and whose output goes nowhere else;
    channel counts must match. Depthwise and grouped convs are fine. Every
    other BN is kept and the report says why.

    Pairs are found in the ``torch.fx.symbolic_trace`` graph (``method="fx"``);
    the BN node is removed and its users read the conv directly. A model fx
    cannot trace (Python control flow on tensor values, ...) falls back to
    ``method="sequential"``: only (conv, BN) that are adjacent children of an
    ``nn.Sequential`` are folded, the BN replaced by ``nn.Identity``. That
    fallback trusts that the Sequential is what runs the pair; the check below
    is what verifies it.

    The check batch is ``example``; without one, a random batch of 2 shaped for
    the first conv/linear in ``module.modules()`` order: ``[2, in_channels, 64, 64]``
    for a 2-D conv (``[2, C, 64]`` for 1-D, ``[2, C, 32, 32, 32]`` for 3-D,
    ``[2, in_features]`` for a Linear), with that layer's dtype and device.
    The report holds the largest differences between the folded and original
    outputs on it (eval mode, no grad); they are reported, not asserted.

    Raises UserError when ``module`` (or any submodule) is in training mode,
    and when the model cannot run on the check batch.
    """
    training = [name or "the model" for name, m in module.named_modules() if m.training]
    if training:
        raise UserError(
            f"fold_batchnorm needs an eval-mode model, but {training[0]} is in training mode; "
            "call model.eval() first (folding uses the running statistics, batch statistics "
            "would give silently wrong weights)"
        )
    given = example is not None
    if example is None:
        example = _default_example(module)
    # One reference run of the original, recording each Linear's output rank:
    # BatchNorm1d normalizes dim 1, which is the Linear's features only on 2-D output.
    linear_ndim: dict[str, int] = {}
    reference = _run(
        module, example, "example" if given else "the default check batch", linear_ndim
    )

    folded_model = copy.deepcopy(module)
    trace_error = None
    try:
        graph = _Tracer().trace(folded_model)
        gm = fx.GraphModule(folded_model, graph)
    except Exception as exc:  # fx fails in many ways: TraceError, TypeError, AttributeError...
        trace_error = _one_line(exc)
    if trace_error is None:
        folded, entries, method = gm, _fold_graph(gm, module, linear_ndim), "fx"
    else:
        entries = _fold_sequential(folded_model, linear_ndim, trace_error)
        folded, method = folded_model, "sequential"
    folded.eval()

    with torch.no_grad():
        result = folded(example)
    abs_diff, rel_diff = _diffs(result, reference)
    report = FoldReport(entries, method, abs_diff, rel_diff, trace_error)
    return folded, report


class _Tracer(fx.Tracer):
    """The default tracer, plus: every BN, conv and linear is a leaf, even a subclass.

    A subclass defined outside ``torch.nn`` would otherwise be traced through
    into ``F.batch_norm`` calls, and such a BN would go unreported.
    """

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_BatchNorm, _ConvNd, nn.Linear)) or super().is_leaf_module(
            m, qualname
        )


def _fold_graph(gm: fx.GraphModule, original: nn.Module, linear_ndim: dict) -> list[FoldEntry]:
    modules = dict(gm.named_modules())
    entries: list[FoldEntry] = []
    seen: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        if node.target in seen:  # a shared BN's second call: reported (kept) at its first
            continue
        seen.add(node.target)
        conv_node = node.args[0] if node.args else None
        reason = _bn_reason(modules[node.target], _uses(gm.graph, node.target))
        if reason is None:
            reason = _input_reason(conv_node, modules)
        if reason is None:
            conv = modules[conv_node.target]
            reason = _pair_reason(conv, conv_node.target, modules[node.target], linear_ndim)
        if reason is None and len(conv_node.users) != 1:
            reason = f"{_kind(conv)} output has another consumer ({len(conv_node.users)} users)"
        if reason is None and (n := _uses(gm.graph, conv_node.target)) != 1:
            reason = f"{_kind(conv)} {conv_node.target} is used {n} times in the forward"
        if reason is not None:
            entries.append(FoldEntry(node.target, None, reason))
            continue
        _write_folded(conv, modules[node.target])
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        entries.append(FoldEntry(node.target, conv_node.target, None))
    gm.graph.lint()
    gm.recompile()
    # BNs that no node calls are not part of the traced model at all.
    for name, m in original.named_modules():
        if isinstance(m, _BatchNorm) and name not in seen:
            reason = "not called in the forward; the traced model leaves it out"
            entries.append(FoldEntry(name, None, reason))
    return entries


def _fold_sequential(model: nn.Module, linear_ndim: dict, trace_error: str) -> list[FoldEntry]:
    # A module registered under two names is shared: folding it would change both uses.
    registered: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        registered[id(m)] = registered.get(id(m), 0) + 1
    all_modules = list(model.named_modules())  # before any BN is replaced
    outcome: dict[str, FoldEntry] = {}
    for seq_name, seq in all_modules:
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (conv_key, conv), (bn_key, bn) in zip(children, children[1:], strict=False):
            if not isinstance(bn, _BatchNorm) or not _is_plain(conv, _FOLD_TARGETS):
                continue
            conv_name = f"{seq_name}.{conv_key}" if seq_name else conv_key
            bn_name = f"{seq_name}.{bn_key}" if seq_name else bn_key
            reason = _bn_reason(bn, registered[id(bn)])
            if reason is None:
                reason = _pair_reason(conv, conv_name, bn, linear_ndim)
            if reason is None and registered[id(conv)] != 1:
                reason = f"{_kind(conv)} {conv_name} is shared ({registered[id(conv)]} names)"
            if reason is None:
                _write_folded(conv, bn)
                setattr(seq, bn_key, nn.Identity())
                outcome[bn_name] = FoldEntry(bn_name, conv_name, None)
            else:
                outcome[bn_name] = FoldEntry(bn_name, None, reason)
    generic = (
        "not directly after a conv/linear in a Sequential "
        f"(fx could not trace the model: {trace_error})"
    )
    return [
        outcome.get(name) or FoldEntry(name, None, generic)
        for name, m in all_modules
        if isinstance(m, _BatchNorm)
    ]


def _bn_reason(bn: nn.Module, uses: int) -> str | None:
    """Why this BN cannot be folded on its own account, or None."""
    if not _is_plain(bn, _BATCHNORMS):
        return f"{type(bn).__name__} is not a plain BatchNorm1d/2d/3d"
    if uses != 1:
        return f"BN module is shared ({uses} uses in the model)"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "BN has no running statistics"
    return None


def _input_reason(arg, modules: dict[str, nn.Module]) -> str | None:
    """Why the BN's input node is not a conv/linear module, or None."""
    if not isinstance(arg, fx.Node):
        return f"input is {type(arg).__name__}, not a conv/linear output"
    if arg.op == "call_module":
        m = modules[arg.target]
        if _is_plain(m, _FOLD_TARGETS):
            return None
        return f"input comes from {type(m).__name__} ({arg.target}), not a conv/linear"
    if arg.op == "placeholder":
        return "input comes from the model input, not a conv/linear"
    if arg.op == "call_function":
        name = getattr(arg.target, "__name__", str(arg.target))
        return f"input comes from function {name}, not a conv/linear"
    if arg.op == "call_method":
        return f"input comes from method .{arg.target}(), not a conv/linear"
    return f"input comes from {arg.op} {arg.target}, not a conv/linear"


def _pair_reason(conv: nn.Module, conv_name: str, bn: nn.Module, linear_ndim: dict) -> str | None:
    """Why this (conv/linear, BN) pair cannot be folded, or None."""
    out = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    if out != bn.num_features:
        return f"channel mismatch: {conv_name} has {out} outputs, BN has {bn.num_features}"
    if isinstance(conv, nn.Linear):
        if not isinstance(bn, nn.BatchNorm1d):
            return f"a Linear is folded only into BatchNorm1d, not {type(bn).__name__}"
        ndim = linear_ndim.get(conv_name)
        if ndim is None:
            return "the Linear did not run on the check batch, so its output shape is unknown"
        if ndim != 2:
            return f"Linear output is {ndim}-D: BatchNorm1d normalizes dim 1, not its features"
    if not conv.weight.is_floating_point():
        return f"{_kind(conv)} weight is {conv.weight.dtype}, not floating point"
    return None


def _write_folded(conv: nn.Module, bn: _BatchNorm) -> None:
    transposed = isinstance(conv, _CONV_TRANSPOSES)
    groups = getattr(conv, "groups", 1)
    w, b = fold_weights(
        conv.weight,
        conv.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight,
        bn.bias,
        transposed=transposed,
        groups=groups,
    )
    grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(w, requires_grad=grad)
    # `bias` is a registered (maybe None) parameter slot on conv and linear layers alike.
    conv.bias = nn.Parameter(b, requires_grad=grad)


def _is_plain(m: nn.Module, types: tuple[type, ...]) -> bool:
    """An instance of ``types`` that runs the standard forward (a subclass may compute more)."""
    if not isinstance(m, types):
        return False
    base = next(t for t in types if isinstance(m, t))
    return type(m).forward is base.forward


def _kind(m: nn.Module) -> str:
    return "linear" if isinstance(m, nn.Linear) else "conv"


def _uses(graph: fx.Graph, name: str) -> int:
    """Nodes that call module ``name`` or read one of its attributes."""
    n = 0
    for node in graph.nodes:
        if node.op == "call_module" and node.target == name:
            n += 1
        elif node.op == "get_attr" and (node.target == name or node.target.startswith(name + ".")):
            n += 1
    return n


def _default_example(module: nn.Module) -> Tensor:
    first = next((m for m in module.modules() if isinstance(m, _FOLD_TARGETS)), None)
    if first is None:
        raise UserError(
            "fold_batchnorm found no Conv/ConvTranspose/Linear layer to shape a check batch; "
            "pass example= with an input batch"
        )
    w = first.weight
    if isinstance(first, nn.Linear):
        shape = (2, first.in_features)
    else:
        shape = (2, first.in_channels, *_CHECK_SIZE[len(first.kernel_size)])
    return torch.randn(shape, dtype=w.dtype, device=w.device)


def _run(model: nn.Module, example: Tensor, what: str, linear_ndim: dict):
    """``model(example)`` without grad, recording each Linear's output rank by name."""
    handles = []
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Linear):

            def hook(_m, _inp, out, name=name):
                linear_ndim[name] = out.dim()

            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(example)
    except Exception as exc:  # a check batch the model rejects shows up as any error type
        raise UserError(
            f"the model failed on {what} of shape {tuple(example.shape)}: {_one_line(exc)}; "
            "pass example= with an input the model accepts"
        ) from exc
    finally:
        for h in handles:
            h.remove()


def _tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def _diffs(result, reference) -> tuple[float, float]:
    pairs = zip(_tensors(result), _tensors(reference), strict=True)
    pairs = [(a.double(), b.double()) for a, b in pairs if b.numel()]
    if not pairs:
        return 0.0, 0.0
    abs_diff = max(float((a - b).abs().max()) for a, b in pairs)
    scale = max(float(b.abs().max()) for _, b in pairs)
    if scale == 0.0:
        return abs_diff, 0.0 if abs_diff == 0.0 else math.inf
    return abs_diff, abs_diff / scale


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
