import os

import pytest
import torch

# Subprocesses that the tests start (CLI runs compared bit for bit with in-process ones) use the
# same thread count as the tests themselves: float reductions differ with the number of threads.
os.environ["OMP_NUM_THREADS"] = "2"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(2)
