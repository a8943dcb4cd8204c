"""Build objects from Hydra-style configs (``_target_``) or pass through ready-made objects.

Modules take *configs* for their parts (net, deformation schedule, optimizer) so that
``save_hyperparameters`` stores plain dicts and a checkpoint alone can rebuild the model.
"""

from __future__ import annotations

from collections.abc import Mapping
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
