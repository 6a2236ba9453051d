"""Small helpers shared by the tests."""

import torch


def with_bn_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm statistics and affine parameters,
    as trained weights have (fresh ones are mean 0, var 1, scale 1, shift 0: folding
    them would test nothing)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()
