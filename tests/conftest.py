"""Shared test setup: CPU, blocking dispatch (PyNative's async pipeline halves speed on 2 cores), fixture paths."""

from __future__ import annotations

import os
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_SDXL = FIXTURES / "tiny_sdxl"

ms.set_context(device_target="CPU")
ms.runtime.launch_blocking()
os.environ.setdefault("MINDONE_STORY_CACHE", str(Path(__file__).parent.parent / ".cache" / "test"))
os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches the real hub; tests/test_hub.py serves its own on 127.0.0.1


def rel_err(ours, ref) -> float:
    """max|ours - ref| / max|ref|: the parity measure used throughout the tests."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="session")
def io():
    return dict(np.load(FIXTURES / "tiny_sdxl_io.npz"))
