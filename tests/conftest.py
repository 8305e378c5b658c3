"""Shared test set-up. TRITON_INTERPRET must be set before anything imports triton, so that the
Triton kernels run under the interpreter on CPU tensors."""

import os

os.environ["TRITON_INTERPRET"] = "1"
