"""Shared test settings.

Without a GPU, Triton kernels run in its interpreter, which must be chosen before triton is first imported (any
test module may import it); property tests are derandomized under CI so a green run stays green on re-run.
"""

import os

import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
