"""The package's layers: pure tensor maths and generation never import what sits above them.

Each check imports in a fresh interpreter, so modules loaded by other tests do not hide an
import that runs back up the layers.
"""

import json
import subprocess
import sys

import pytest

# (hydra's instantiate rebuilds the stored ``_target_`` configs: that is a library, not a layer)
ABOVE_GENERATION = ("drdm.models", "drdm.augmentation", "drdm.synthesis", "lightning")


def _loaded_after(code: str) -> list[str]:
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _offending(modules: list[str], forbidden) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize("package", ["drdm.deform", "drdm.losses", "drdm.generation.chain"])
def test_pure_tensor_maths_imports_no_training_framework(package):
    modules = _loaded_after(f"import {package}")
    assert not _offending(modules, ("lightning", "hydra", "omegaconf", "drdm.models"))


def test_loading_a_lightning_checkpoint_for_generation_needs_no_lightning_module():
    """``DRDM.load`` rebuilds the packaged ``.ckpt`` from its stored configs."""
    code = (
        "from drdm.generation import DRDM\n"
        "drdm = DRDM.load('default')\n"
        "assert drdm.image_size == (64, 64), drdm.image_size"
    )
    assert not _offending(_loaded_after(code), ABOVE_GENERATION)
