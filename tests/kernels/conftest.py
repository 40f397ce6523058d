"""Kernel tests run on the GPU when there is one, else on CPU through Triton's interpreter.

TRITON_INTERPRET=1 is set per test (monkeypatch), not for the process: lctrain's kernels read it at
launch time, so nothing else in the pytest process (e.g. the automatic attention dispatch of other
tests) ever sees it. Every kernel output starts NaN-poisoned so an unwritten element fails the test.
"""
import pytest
import torch

from lctrain.kernels.utils import poison_outputs


@pytest.fixture(autouse=True)
def _triton_interpreter_on_cpu(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with poison_outputs():
        yield


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
