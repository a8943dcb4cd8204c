"""drdm as an installed library: a wheel built from this checkout, installed into a fresh folder
and used from another folder, loads the packaged model and the authors' ``.pth``, generates and
runs the TorchIO transforms (the forward-process configs they read are package data)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, torch
import drdm
from drdm.generation import DRDM
assert "{target}" in drdm.__file__, drdm.__file__   # the installed copy, not the checkout
packaged = DRDM.load("default", sampling_steps=2)
out = packaged.generate(torch.rand(64, 64), num_samples=1, seed=0)
assert out.image.shape == (1, 1, 64, 64)
authors = DRDM.load(sys.argv[1], sampling_steps=2)
assert authors.compose_padding == "zeros" and authors.net.displacement_limit == "component"
out = authors.generate(torch.rand(256, 256), num_samples=1, seed=0)
assert out.displacement.shape == (1, 2, 256, 256)
import torchio as tio
from drdm.transforms import RandomDiffeomorphic, RandomDRDM
subject = tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, 64, 64, 1)))
for transform in (RandomDiffeomorphic(), RandomDRDM("default", options=dict(sampling_steps=2))):
    deformed = transform(subject)
    assert deformed["drdm"]["max_mm"] > 0
    assert deformed.apply_inverse_transform()["drdm"]["inverse_residual_mean"] < 0.05
print("ok")
"""


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_loads_both_checkpoints(reference_dir, tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)]
    done = subprocess.run(build, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(wheels.glob("drdm-*.whl"))
    install = [*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "DRDM_ROOT"}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    checkpoint = reference_dir / "cmr_recresacnet_reference.pth"
    script = SCRIPT.format(target=target)
    run = [sys.executable, "-c", script, str(checkpoint)]
    done = subprocess.run(run, cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
