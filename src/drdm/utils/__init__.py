"""Hydra instantiation helpers and figure helpers shared by the scripts and modules."""

from drdm.utils.instantiate import build, to_plain

__all__ = ["build", "to_plain"]
