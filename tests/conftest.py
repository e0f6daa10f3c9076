import os

import pytest
import torch

# one intra-op thread by default: test tensors are small and CI cores are shared, where extra threads only add
# synchronisation cost (measured 3x slower with 2 threads); PTYL_TEST_THREADS overrides
torch.set_num_threads(int(os.environ.get("PTYL_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
