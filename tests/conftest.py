import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so its numbers are reproducible."""
    torch.manual_seed(0)


@pytest.fixture
def quiet_defaults():
    """Files made elsewhere warn that they run with default preprocessing: expected in the
    tests that use them (``pytestmark = pytest.mark.usefixtures("quiet_defaults")``)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(autouse=True)
def _forget_declared_metadata():
    """--mean, --labels, ... declare metadata for a file for the rest of the process
    (contract.declare); each test starts and ends without any."""
    from convforge import contract

    yield
    contract._DECLARED.clear()
    contract._WARNED.clear()
