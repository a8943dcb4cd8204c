"""One way to derive seeds: mix integers (a run's seed, a rank, an epoch, a sample index) into one.

Pure Python, used by every layer that seeds a generator from a tuple of keys (the data loader's
epoch shuffle, the training step's fields, generation's per-sample fields), so equal keys give
equal seeds everywhere.
"""

from __future__ import annotations

_SEED_MIX = 1_000_003  # a prime
_MODULUS = 2**63 - 1  # torch.Generator.manual_seed takes up to 64 bits


def mix_seed(*keys: int) -> int:
    """Combine integers into one 63-bit seed (order matters)."""
    value = 0
    for key in keys:
        value = (value * _SEED_MIX + int(key)) % _MODULUS
    return value
