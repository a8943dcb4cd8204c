"""drdm against the authors' own code (``../shared/reference/def_diff_rec``), run side by side.

With the authors' weights, drdm's ``RecResACNet`` must give their network's output to float
rounding (1 and 2 recursive passes), and drdm's recovery chain must compose fields as their
``diff_recover`` does. Skips cleanly when the reference code or data is absent.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REFERENCE_DIR

from drdm.checkpoints import load_reference_checkpoint
from drdm.generation.chain import recover

REFERENCE_CODE = REFERENCE_DIR.parent.parent / "reference" / "def_diff_rec"
BENCHMARKS = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
SIZE = 256


@pytest.fixture(scope="module")
def authors():
    """The authors' ``Diffusion`` package (their code, imported from ``../shared``)."""
    if not (REFERENCE_CODE / "Diffusion" / "diffuser.py").is_file():
        pytest.skip(f"the authors' code is not at {REFERENCE_CODE}")
    sys.path.insert(0, str(REFERENCE_CODE))
    try:
        import Diffusion.networks as networks
    finally:
        sys.path.remove(str(REFERENCE_CODE))
    return networks


@pytest.fixture(scope="module")
def fidelity():
    """``experiments/benchmarks/fidelity.py``: it builds the authors' ``DeformDDPM`` as their
    2D config does (one place for those settings, the benchmark's)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("fidelity")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def weights(reference_dir):
    return reference_dir / "cmr_recresacnet_reference.pth"


@pytest.fixture(scope="module")
def slice_256(reference_dir) -> torch.Tensor:
    """Slice 5 of the shared ACDC volume, 0..1, resized to 256 x 256: ``[1, 1, 256, 256]``."""
    volume = nib.load(reference_dir / "acdc_patient001_frame01.nii.gz").get_fdata()
    image = torch.from_numpy(volume[:, :, 5].astype(np.float32))[None, None]
    image = F.interpolate(image, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
    return (image - image.min()) / (image.max() - image.min())


def _their_network(networks, weights):
    net = networks.RecResACNet(n_steps=80, time_emb_dim=100, ndims=2, num_input_chn=1)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("passes", [1, 2])
def test_the_loaded_network_is_the_authors_network_to_float_rounding(
    authors, weights, slice_256, passes
):
    theirs = _their_network(authors, weights)
    ours = load_reference_checkpoint(weights)
    torch.manual_seed(0)
    # the slice and a strongly deformed copy of it (large predicted fields hit the bound)
    shift = torch.randn(1, 2, 8, 8) * 0.08
    grid = F.affine_grid(torch.eye(2, 3)[None], (1, 1, SIZE, SIZE), align_corners=True)
    offset = F.interpolate(shift, size=(SIZE, SIZE), mode="bicubic").permute(0, 2, 3, 1)
    deformed = F.grid_sample(slice_256, grid + offset, align_corners=True)
    images = torch.cat([slice_256, deformed, slice_256.flip(-1)])
    t = torch.tensor([70, 79, 10])
    with torch.no_grad():
        expected = theirs(images, t, rec_num=passes) * SIZE  # fractions of the side -> voxels
        got = ours(images, t, recursions=passes)
    assert _relative(got, expected) < 1e-4, _relative(got, expected)
    # drdm's own in-image clamp is a different network with these weights
    ours.displacement_limit = "image"
    with torch.no_grad():
        clamped = ours(images, t, recursions=passes)
    assert _relative(clamped, expected) > 10 * _relative(got, expected)


def test_the_recovery_chain_composes_fields_as_the_authors_diff_recover(
    fidelity, weights, slice_256
):
    """Three steps of their ``diff_recover`` loop (their network, their STNs: field padding
    ``zeros``, image ``bicubic``) against :func:`drdm.generation.chain.recover` from the same
    diffused field."""
    ddpm = fidelity.authors_model(weights, "cpu")
    torch.manual_seed(3)
    _, _, ddf_rand = ddpm(slice_256, torch.tensor([40]))
    steps = 3
    with torch.no_grad():
        field = ddf_rand.clone()
        image = ddpm.img_stn(slice_256, field)
        for i in range(steps - 1, -1, -1):  # the loop of DeformDDPM.diff_recover
            prediction = ddpm.backward(image, torch.tensor([i]), rec_num=None)
            field = ddpm.ddf_stn_full(field, prediction) + prediction
            image = ddpm.img_stn(slice_256, field)
        expected = field * SIZE
        got, border = (
            recover(
                load_reference_checkpoint(weights),
                slice_256,
                ddf_rand * SIZE,
                torch.tensor([steps - 1]),
                mode="bicubic",
                compose_padding=padding,
            )
            for padding in ("zeros", "border")
        )
    error = _relative(got, expected)
    assert error < 1e-4, error
    assert _relative(border, expected) > 10 * error
