"""Test session setup: Triton's kernels run in its CPU interpreter where no GPU is present.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so it is set here, before
any test module imports the package; a value already in the environment is kept (set it to 0 on
a GPU machine to test the compiled kernels).
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
