"""Test setup: Triton's interpreter when no GPU is present, and the `gpu` / `slow` markers.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: minutes of CPU; runs only with MEMRL_SLOW=1")


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("MEMRL_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow; set MEMRL_SLOW=1"))
