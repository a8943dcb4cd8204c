"""Build objects from Hydra-style configs (``_target_``) or pass through ready-made objects.

Modules take *configs* for their parts (net, forward process, optimizer) so that
``save_hyperparameters`` stores plain dicts and a checkpoint alone can rebuild the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(config: Any) -> Any:
    """DictConfig/ListConfig -> plain (resolved) dict/list; anything else unchanged."""
    if isinstance(config, DictConfig | ListConfig):
        return OmegaConf.to_container(config, resolve=True)
    return config


def build(config_or_object: Any, **kwargs: Any) -> Any:
    """Instantiate a ``{"_target_": ...}`` mapping (``kwargs`` override); return objects as is.

    Raises:
        ValueError: a mapping without ``_target_``.
    """
    if isinstance(config_or_object, Mapping | DictConfig):
        if "_target_" not in config_or_object:
            raise ValueError(
                f"config needs a '_target_' key to be instantiated, got keys "
                f"{sorted(config_or_object)}"
            )
        return hydra.utils.instantiate(config_or_object, **kwargs)
    return config_or_object


def load_config(path: str | Path) -> DictConfig:
    """One option file of a config group, with the group-internal ``defaults`` it builds on.

    ``conf/deformation/reference_2d.yaml`` lists ``defaults: [base, _self_]``; Hydra merges
    ``base.yaml`` first when it composes the group. This does the same for code that reads one
    file (benchmarks, tests, the loader of the authors' checkpoint): entries are sibling file
    names, ``_self_`` is the file itself (last when not listed), merged in order.

    Raises:
        FileNotFoundError: the file or one of its defaults is missing (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    config = OmegaConf.load(path)
    defaults = list(config.pop("defaults", None) or [])
    if "_self_" not in defaults:
        defaults.append("_self_")
    merged = OmegaConf.create()
    for entry in defaults:
        part = config if entry == "_self_" else load_config(path.with_name(f"{entry}.yaml"))
        merged = OmegaConf.merge(merged, part)
    return merged


def config_dir() -> Path:
    """The ``conf/`` folder of the checkout this package runs from, else ``$DRDM_ROOT/conf``
    (``DRDM_ROOT`` also moves ``logs/``, so it is only the fallback)."""
    checkout = Path(__file__).resolve().parents[3] / "conf"
    if checkout.is_dir() or not os.environ.get("DRDM_ROOT"):
        return checkout
    return Path(os.environ["DRDM_ROOT"]) / "conf"
