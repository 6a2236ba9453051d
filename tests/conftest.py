import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so its numbers are reproducible."""
    torch.manual_seed(0)
