"""Shared test set-up. TRITON_INTERPRET must be set before anything imports triton, so that the
Triton kernels run under the interpreter on CPU tensors."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and the CLI sets one); restore the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
