"""Every checkpoint kind drdm reads or writes, in one module.

* the authors' RecResACNet weights (a plain ``state_dict`` ``.pth``), loaded strictly: the
  architecture (``ndims``, ``in_channels``, ``timesteps``, ``time_dim``, ``channels``) is read
  from the tensor shapes, so the 2D cardiac checkpoint and a 3D one of the same layout load
  without configuration (:func:`load_reference_checkpoint`);
* Lightning ``.ckpt`` files of ``DRDMModule`` (:func:`read_lightning_checkpoint`,
  :func:`network_state`, :func:`rebuild_drdm`: network and forward process rebuilt from the
  stored configs, no LightningModule involved), including the legacy EMA layout
  (:func:`upgrade_ema_layout`);
* the slim packaged form (:func:`export_checkpoint`) and the word ``"default"`` for the packaged
  model (:func:`resolve_checkpoint`);
* network weights for fine-tuning from either kind (:func:`initialise_from`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from drdm.nets.recresacnet import RecResACNet
from drdm.pretrained import DEFAULT_MODEL, DEFAULT_NAME
from drdm.utils.atomic import atomic_write
from drdm.utils.errors import first_line

# tensors whose shapes determine the constructor arguments
_SHAPE_KEYS = ("time_embed.weight", "b1.0.conv0.weight", "b2.0.conv0.weight", "b3.0.conv0.weight")


def _read_state_dict(path: str | os.PathLike, map_location) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"RecResACNet checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt / non-torch files
        message = f"cannot read {path} as a torch state_dict ({first_line(error)})"
        raise ValueError(message) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ValueError(
            f"{path} is not a plain state_dict (a mapping of parameter names to tensors); "
            f"got {type(state).__name__}"
            + (f" with keys {sorted(state)[:8]}" if isinstance(state, Mapping) else "")
        )
    return dict(state)


def _architecture(path, state: Mapping[str, torch.Tensor]) -> dict:
    """Constructor arguments of :class:`RecResACNet` implied by the tensor shapes."""
    missing = [key for key in _SHAPE_KEYS if key not in state]
    if missing:
        raise ValueError(
            f"{path} does not look like a RecResACNet state_dict: missing {missing} "
            f"(it has {len(state)} tensors, e.g. {sorted(state)[:5]})"
        )
    conv = state["b1.0.conv0.weight"]
    timesteps, time_dim = state["time_embed.weight"].shape
    return {
        "ndims": conv.ndim - 2,
        "in_channels": int(conv.shape[1]),
        "timesteps": int(timesteps),
        "time_dim": int(time_dim),
        "channels": tuple(int(state[key].shape[0]) for key in _SHAPE_KEYS[1:]),
    }


def load_reference_checkpoint(
    path: str | os.PathLike,
    map_location="cpu",
    recursions: int = 2,
    displacement_limit: str = "component",
) -> RecResACNet:
    """Build a :class:`RecResACNet` matching the checkpoint at ``path`` and load it strictly.

    Args:
        path: ``.pth`` file holding a plain ``state_dict`` (e.g. the authors'
            ``cmr_recresacnet_reference.pth``: 2D, 1 channel, T = 80).
        map_location: passed to ``torch.load``.
        recursions: refinement passes of the returned network.
        displacement_limit: ``"component"`` (default): the authors' bound, with which the loaded
            network reproduces theirs to float rounding (``tests/test_reference_parity.py``);
            ``"image"``: drdm's in-image clamp (4-17 % different outputs with these weights).

    Returns:
        The network in eval mode, ``net(image [B,C,*S], t [B]) -> displacement`` in voxels.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a state_dict, or its keys / shapes do not match the layout (the message
            names the file and the missing, unexpected or mis-shaped keys).
    """
    state = _read_state_dict(path, map_location)
    net = RecResACNet(
        **_architecture(path, state), recursions=recursions, displacement_limit=displacement_limit
    )
    _load_strictly(net, state, path)
    return net.eval()


def _load_strictly(net: torch.nn.Module, state: Mapping[str, torch.Tensor], path) -> None:
    """``net.load_state_dict(state, strict=True)`` with one error naming every bad key."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
        for key in set(expected) & set(state)
        if state[key].shape != expected[key].shape
    )
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"{path} does not match the {type(net).__name__} layout: missing keys {missing}, "
            f"unexpected keys {unexpected}, mis-shaped {mis_shaped}"
        )
    # load_state_dict copies values but keeps requires_grad: the step table stays frozen
    net.load_state_dict(state, strict=True)


def read_lightning_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A Lightning ``.ckpt`` as a dict, with ``weights_only=True`` (hyper-parameters are plain
    containers beside the tensors); an unreadable file raises a ``ValueError`` naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt / non-torch files
        raise ValueError(
            f"cannot read {path} as a Lightning checkpoint ({first_line(error)})"
        ) from None
    if not isinstance(checkpoint, dict):
        kind = type(checkpoint).__name__
        raise ValueError(f"{path} is not a Lightning checkpoint (it holds a {kind})")
    return checkpoint


def upgrade_ema_layout(checkpoint: dict) -> None:
    """Checkpoints from before the EMA callback kept the averaged copy as ``ema.module.*``:
    move it to ``net.*`` and the trained weights to ``current_model_state``, the layout of
    Lightning's ``WeightAveraging`` (in place; other checkpoints are left as they are)."""
    state = checkpoint.get("state_dict") or {}
    averaged = {k[len("ema.module.") :]: v for k, v in state.items() if k.startswith("ema.module.")}
    if not averaged:
        return
    count = state.get("ema.n_averaged")
    trained = {k: v for k, v in state.items() if not k.startswith("ema.")}
    checkpoint["current_model_state"] = trained
    checkpoint["state_dict"] = {**trained, **{"net." + k: v for k, v in averaged.items()}}
    if count is not None:
        checkpoint["averaging_state"] = {"n_averaged": count}


def network_state(path, checkpoint: Mapping, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The recovery network's weights in a Lightning checkpoint of ``DRDMModule``.

    The EMA weights when ``use_ema`` and the run kept them, else the trained ones; keys without
    the ``net.`` prefix. Under Lightning's ``WeightAveraging`` the ``state_dict`` holds the
    averaged weights and ``current_model_state`` the trained ones; older checkpoints (averaged
    copy as ``ema.module.*``) are read through :func:`upgrade_ema_layout`.
    """
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(f"{path} is a Lightning checkpoint without a 'state_dict'")
    checkpoint = dict(checkpoint)  # the upgrade must not change the caller's checkpoint
    upgrade_ema_layout(checkpoint)
    state = checkpoint["state_dict"]
    trained = checkpoint.get("current_model_state")
    if not use_ema and isinstance(trained, Mapping):
        state = trained
    weights = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    if not weights:
        raise ValueError(
            f"{path} holds no DRDMModule network weights (no 'net.*' or 'ema.module.*' keys; "
            f"it has e.g. {sorted(state)[:5]})"
        )
    return weights


def initialise_from(net: torch.nn.Module, path: str | os.PathLike, map_location="cpu") -> None:
    """Copy recovery-network weights from ``path`` into ``net`` (fine-tuning), strictly.

    Args:
        net: the network to initialise (same layout as the file's: same class, ``channels``,
            ``ndims``, ``timesteps``, ``time_dim``).
        path: the authors' plain ``state_dict`` ``.pth``, or a Lightning ``.ckpt`` written by
            ``src/train.py`` (its EMA weights when it has them).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an unreadable file, or keys / shapes that do not match ``net`` (the message
            names the file and every missing, unexpected and mis-shaped key).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_weights: no checkpoint file at {path}")
    if str(path).endswith(".ckpt"):
        state = network_state(path, read_lightning_checkpoint(path, map_location))
    else:
        state = _read_state_dict(path, map_location)
    _load_strictly(net, state, path)


def rebuild_drdm(path, map_location="cpu", use_ema: bool = True):
    """``(net, deformation, hyper-parameters, generation defaults)`` of a ``DRDMModule``
    checkpoint, rebuilt from the configs it stores (no LightningModule involved); ``net`` in
    eval mode with the EMA weights when ``use_ema`` and the run kept them."""
    # Hydra rebuilds the stored configs: imported here so that generation's pure chain
    # (drdm.generation.chain) imports without Hydra (tests/test_layers.py)
    from drdm.utils.instantiate import build

    checkpoint = read_lightning_checkpoint(path, map_location)
    hparams = checkpoint.get("hyper_parameters") or {}
    missing = [key for key in ("net", "deformation", "image_size") if not hparams.get(key)]
    if missing:
        raise ValueError(
            f"{path}: not a DRDMModule checkpoint (its hyper-parameters lack {missing}; "
            "modules built from objects, not configs, cannot be rebuilt from a file)"
        )
    net = build(hparams["net"])
    _load_strictly(net, network_state(path, checkpoint, use_ema), path)
    deformation = build(hparams["deformation"])
    return net.eval(), deformation, hparams, dict(checkpoint.get("generation_defaults") or {})


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``"default"`` -> the packaged model (:mod:`drdm.pretrained`); any other value ->
    ``Path(path)``.

    Raises:
        FileNotFoundError: ``"default"`` on an install without the packaged file.
    """
    if str(path) != DEFAULT_NAME:
        return Path(path)
    if not DEFAULT_MODEL.is_file():
        raise FileNotFoundError(
            f"the packaged default DRDM {DEFAULT_MODEL} is missing from this install; "
            "reinstall drdm or pass a checkpoint path"
        )
    return DEFAULT_MODEL


def _lightning_version() -> str | None:
    try:
        return version("lightning")
    except PackageNotFoundError:
        return None


def export_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    use_ema: bool = True,
    generation_defaults: dict | None = None,
) -> Path:
    """Write a slim copy of a ``DRDMModule`` checkpoint for shipping or sharing.

    Keeps the hyper-parameters (the net and forward-process configs rebuild the model) and one set
    of network weights (the EMA copy when ``use_ema`` and the run kept one), stored as the
    module's ``net`` with EMA off; drops optimiser, scheduler and loop states.
    ``generation_defaults`` (:class:`drdm.generation.DRDM` arguments, e.g. ``t0_start``,
    ``start_step``) are stored for ``DRDM.load`` to use where its caller sets nothing. The
    result loads with ``DRDMModule.load_from_checkpoint`` and ``DRDM.load``; written atomically.
    """
    checkpoint = read_lightning_checkpoint(source)
    weights = {"net." + k: v for k, v in network_state(source, checkpoint, use_ema).items()}
    hyper_parameters = dict(checkpoint["hyper_parameters"])
    # no EMA copy, no init file, no figures folder of the machine that trained it
    hyper_parameters.update(ema_decay=None, init_weights=None, figure_dir=None)
    slim = {
        "state_dict": weights,
        "hyper_parameters": hyper_parameters,
        "pytorch-lightning_version": checkpoint.get("pytorch-lightning_version")
        or _lightning_version(),
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "generation_defaults": dict(generation_defaults or {}),
    }
    return atomic_write(destination, lambda temporary: torch.save(slim, temporary))
