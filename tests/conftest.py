"""Shared test settings.

Without a GPU, Triton kernels run in its interpreter, which must be chosen before triton is first imported (any
test module may import it); property tests are derandomized under CI so a green run stays green on re-run.
"""

import os

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's ops are too small to share: extra threads only contend for the CI box's two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(LoadedModel, transformers reference) of a tiny random Llama with SmolLM2's tokenizer, in float32."""
    from multiverse_testing import save_tiny_llama
    from treadle.engine.config import EngineConfig
    from treadle.engine.loader import load_model

    path = str(tmp_path_factory.mktemp("tiny_llama"))
    reference = save_tiny_llama(path)
    return load_model(EngineConfig(model=path, dtype="float32"), progress=False), reference
