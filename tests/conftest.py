"""Shared fixtures: the reference data beside the checkout, skipped cleanly when absent."""

import os
from pathlib import Path

import pytest
import torch

from drdm.apps.train import register_resolvers

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(
    os.environ.get("DRDM_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "data" / "drdm_reference")
)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# pytest-xdist already runs one worker per core: more threads per worker (and per subprocess the
# tests start) only oversubscribe the CPU, which slows tiny convolutions down many times over
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# the configs the tests compose use drdm's resolvers, as the scripts do
register_resolvers()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny 2D DRDM (32 x 32, T = 20) trained for two steps, as a Lightning ``.ckpt``."""
    from helpers.augment_inputs import tiny_drdm_checkpoint

    return tiny_drdm_checkpoint(tmp_path_factory.mktemp("drdm_ckpt"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """`../shared/data/drdm_reference` (override with DRDM_REFERENCE_DIR); skips when absent."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


try:  # property tests draw the same examples on every run, so CI cannot flake
    from hypothesis import settings

    settings.register_profile("drdm", derandomize=True, deadline=None)
    settings.load_profile("drdm")
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    pass
