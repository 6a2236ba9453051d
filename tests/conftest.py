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
def _forget_warned_files():
    """read_info says a file's defaults once per file and process (contract._WARNED); each
    test starts without any said, so a test of the warning does not depend on the order."""
    from convforge import contract

    yield
    contract._WARNED.clear()
