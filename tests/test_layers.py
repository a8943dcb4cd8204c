"""The package's layers: nothing imports a layer above its own.

Order, lowest first (also in ``drdm/__init__.py``)::

    deform, losses < metrics < nets < checkpoints < data < generation < field_sources
        < augmentation, registration, transforms < models < apps

Each check imports a package in a fresh interpreter and lists the drdm packages it loaded, so
modules loaded by other tests do not hide an import that runs back up the layers.
"""

import json
import subprocess
import sys

import pytest

LAYERS = [
    ("drdm.deform", "drdm.losses"),
    ("drdm.metrics",),
    ("drdm.nets",),
    ("drdm.checkpoints", "drdm.pretrained"),
    ("drdm.data",),
    ("drdm.generation",),
    ("drdm.field_sources",),
    ("drdm.augmentation", "drdm.registration", "drdm.transforms"),
    ("drdm.models",),
    ("drdm.apps",),
]
# helpers every layer may use (no drdm imports above them)
SHARED = ("drdm.utils",)


def _loaded_after(code: str) -> list[str]:
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _offending(modules: list[str], forbidden) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize("index", range(len(LAYERS)), ids=lambda i: "+".join(LAYERS[i]))
def test_no_layer_imports_one_above_it(index):
    above = [package for layer in LAYERS[index + 1 :] for package in layer]
    for package in LAYERS[index]:
        loaded = _loaded_after(f"import {package}")
        assert not _offending(loaded, above), f"{package} imports {_offending(loaded, above)}"


def test_the_utilities_import_no_layer():
    every = [package for layer in LAYERS for package in layer]
    for module in ("drdm.utils.atomic", "drdm.utils.seeds", "drdm.utils.errors"):
        assert not _offending(_loaded_after(f"import {module}"), every)


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
    above = ("drdm.models", "drdm.augmentation", "drdm.field_sources", "drdm.apps", "lightning")
    assert not _offending(_loaded_after(code), above)
