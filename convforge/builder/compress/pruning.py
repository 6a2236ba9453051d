"""Structured channel pruning down to a compute budget, with torch-pruning.

Whole channels (a conv's output filters, with everything that reads or
normalizes them) are removed, so the result is an ordinary, smaller dense model:
``builder.widths`` records its shape and every exporter and backend runs it as is.
torch-pruning's dependency graph finds which layers must lose the same channels
(a residual stage shares one set; a group norm loses one channel per group).

The schedule is the one of torch-pruning's own benchmarks (``progressive_pruning``
in its ``reproduce/main.py``): a pruner aiming at ratio 1.0 over many small
steps, counting MACs after each and stopping at the first step within budget.
Pruning is local (every layer loses the same fraction of its channels per step),
so no layer collapses; the importance only picks which channels go.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.flop_counter import FlopCounterMode

from convforge.errors import UserError, check_choice, check_int

IMPORTANCES = ("l1", "l2", "bn", "taylor")
# What each ranks a channel by (torch-pruning's estimators, summed over the group's layers):
# l1 / l2: the L1 / L2 norm of its weights; bn: |BatchNorm scale|; taylor: |weight x gradient|
# of the loss (first-order estimate of the loss change when the channel is removed).


def macs_and_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(multiply-accumulates for one image, parameters) of ``model`` on ``example``'s shape.

    MACs count conv and linear layers only, as :mod:`convforge.builder.complexity`
    does (FlopCounterMode flops // 2), on ``example[:1]`` in eval mode; the model
    is left in the train/eval mode it (and each submodule) was in.
    """
    modes = {m: m.training for m in model.modules()}
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model.eval()(example[:1])
    finally:
        for m, training in modes.items():
            m.training = training
    return counter.get_total_flops() // 2, sum(p.numel() for p in model.parameters())


def prune_to(
    model: nn.Module,
    example: torch.Tensor,
    target_macs: int,
    importance: str,
    *,
    loss_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    round_to: int | None = None,
    ignored: list[nn.Module] | None = None,
    max_steps: int = 400,
) -> int:
    """Prune ``model`` in place until its MACs (:func:`macs_and_params`) are <= ``target_macs``;
    return the MACs reached.

    Stops early with what it reached when nothing more can go: after ``max_steps``
    steps (the pruning ratio is then 1.0) every layer is down to its last few channels;
    none ever loses all of them (a group norm keeps one per group). ``example`` is an
    input batch of the model's shape (only its first image is used). Never pruned: the
    last linear layer's outputs (the classes), the input channels, the layers in ``ignored``.

    ``importance`` is one of :data:`IMPORTANCES` (UserError otherwise, and for
    ``"bn"`` on a model without BatchNorm). ``"taylor"`` needs ``loss_batches``:
    ``(images, labels)`` pairs, a few, re-iterable (a list); before each step the
    cross-entropy gradients of all of them are accumulated, in eval mode so that
    BatchNorm statistics stay as they are (ValueError when missing).
    ``round_to``: keep every pruned width the multiple of it nearest to the schedule's
    (e.g. 16, the channel block of AVX-512 int8 kernels; never below ``round_to``, and
    a layer narrower than it is left alone); not with a group norm of several groups,
    which keeps widths divisible by its groups itself. The same model and arguments
    always prune the same channels.
    Train/eval modes and ``requires_grad`` flags are restored before returning; every
    ``.grad`` is left None (pruned parameters are new tensors: rebuild any optimizer).
    """
    check_choice("importance", importance, IMPORTANCES)
    check_int("target MACs", target_macs)
    check_int("max_steps", max_steps)
    if round_to is not None:
        check_int("round_to", round_to)
        _check_round_to(model)
    if importance == "bn" and not any(isinstance(m, _BatchNorm) for m in model.modules()):
        norms = sorted({type(m).__name__ for m in model.modules() if _is_norm(m)})
        raise UserError(
            f"--importance bn needs BatchNorm layers; this {type(model).__name__} has "
            f"{', '.join(norms) or 'no norm layers'}; use l1, l2 or taylor"
        )
    batches = None
    if importance == "taylor":
        if loss_batches is None:
            raise ValueError("importance 'taylor' needs loss_batches to take gradients on")
        batches = list(loss_batches)  # each step reads them all again
    example = example[:1]
    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        model.eval()  # the graph, MAC counts and gradients see the inference network
        # torch-pruning traces autograd: a frozen layer's output has no grad_fn and would drop
        # out of the graph (pruned around, then mismatched); taylor ranks frozen layers too.
        for p in model.parameters():
            p.requires_grad_(True)
        pruner = _pruner(model, example, importance, round_to, ignored or [], max_steps)
        macs = macs_and_params(model, example)[0]
        while macs > target_macs and pruner.current_step < max_steps:
            if batches is not None:
                _accumulate_gradients(model, batches)
            pruner.step()
            model.zero_grad(set_to_none=True)
            macs = macs_and_params(model, example)[0]
    finally:
        model.zero_grad(set_to_none=True)
        # Pruned parameters are new nn.Parameters (requires_grad=True): restore by name.
        for name, m in model.named_modules():
            m.training = modes[name]
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])
    return macs


def _pruner(model, example, importance, round_to, ignored, max_steps) -> tp.pruner.BasePruner:
    """torch-pruning's pruner for ``model``: local, ratio 1.0 over ``max_steps`` steps."""
    estimators = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn": tp.importance.BNScaleImportance,
        "taylor": tp.importance.GroupTaylorImportance,
    }
    # The classifier's outputs are the classes: the last linear layer (a model without one
    # ends in a conv) keeps them; its inputs still shrink with the layer feeding it.
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    heads = heads or [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # torch-pruning builds its graph from autograd. An in-place activation on a view (an
    # instance norm's output is one) rewrites that view's grad_fn, and the norm drops out of
    # the graph, unpruned; so the graph is traced with every activation out of place.
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in inplace:
        m.inplace = False
    try:
        return _NearestRounding(
            model,
            # A tuple: torch-pruning calls model(*example_inputs), which would unpack a bare
            # tensor along the batch dimension.
            (example,),
            importance=estimators[importance](),
            pruning_ratio=1.0,
            max_pruning_ratio=1.0,  # a group that would lose every channel is skipped instead
            iterative_steps=max_steps,
            ignored_layers=[heads[-1], *ignored],
            round_to=round_to,
        )
    finally:
        for m in inplace:
            m.inplace = True


class _NearestRounding(tp.pruner.BasePruner):
    """torch-pruning's pruner, rounding each width to the nearest multiple of ``round_to``.

    torch-pruning floors it: with round_to=16 a 64-wide layer drops to 48 at the first 1%
    step and to 16 once its schedule says 31, so narrow layers lose a quarter or a half at
    once and the MAC target is overshot (4x asked gave 6.5x on ResNet-18). Its
    ``_round_to`` hook receives the schedule's width as ``current - n_pruned``.
    """

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        kept = round_to * int((current_channels - n_pruned) / round_to + 0.5)
        return max(current_channels - max(kept, round_to), 0)


def _accumulate_gradients(model: nn.Module, batches: list) -> None:
    """Sum the cross-entropy gradients of ``batches`` into every parameter's ``.grad``."""
    model.zero_grad(set_to_none=True)
    for images, labels in batches:
        F.cross_entropy(model(images), labels).backward()


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm))


def norm_groups(model: nn.Module) -> int:
    """The most groups of any group norm in ``model`` (1 without one)."""
    return max((m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)), default=1)


def _check_round_to(model: nn.Module) -> None:
    """UserError when ``model`` has a group norm of several groups: torch-pruning removes
    one channel per group there, and its rounding counts those per-group channels against
    whole widths, which prunes too much."""
    groups = norm_groups(model)
    if groups > 1:
        raise UserError(
            f"--round-to cannot be combined with group norm ({groups} groups): pruning "
            "removes one channel from each group, so widths stay divisible by the groups"
        )
