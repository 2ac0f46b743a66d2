import os

import pytest
import torch

from qat_sadam.quant.kernels import use_fused_kernels

# Subprocesses that the tests start (CLI runs compared bit for bit with in-process ones) use the
# same thread count as the tests themselves: float reductions differ with the number of threads.
os.environ["OMP_NUM_THREADS"] = "2"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _fused_kernels_back_on():
    """Tests that switch to the eager kernels (use_fused_kernels(False)) leave the default behind them."""
    yield
    use_fused_kernels(True)
