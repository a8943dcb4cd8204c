"""Training-set shuffling that a resumed run reproduces: the order is a function of (seed, epoch).

A plain ``RandomSampler`` draws its permutation from the process's global random state, which a
checkpoint does not hold: a run resumed at epoch ``e`` would shuffle epoch ``e`` differently from
the uninterrupted run. :class:`EpochShuffle` draws epoch ``e``'s permutation, and the base seed
of the loader's workers, from ``(seed, e)`` alone. Lightning calls :meth:`EpochShuffle.set_epoch`
before each epoch; under DDP it replaces any ``RandomSampler`` (this class too) by a
``DistributedSampler`` seeded the same way, so the guarantee holds there as well.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler

from drdm.utils.seeds import mix_seed

# streams of mix_seed(seed, epoch, stream): keep the shuffle, the workers and the training
# step's global re-seed (drdm.apps.train.RankSeed) apart
SHUFFLE_STREAM, WORKER_STREAM, GLOBAL_STREAM = 0, 1, 2


class EpochShuffle(RandomSampler):
    """A new permutation of ``range(len(data_source))`` every epoch, from ``(seed, epoch)`` only.

    Args:
        data_source: the dataset (only its length is used).
        seed: the run's seed.
        epoch: the epoch the loader is created in (a resumed run creates it mid-run).

    ``worker_generator`` is meant for the ``DataLoader``'s ``generator``: the loader draws its
    workers' base seed from it when an epoch's iterator is created, so workers are seeded from
    ``(seed, epoch)`` too (with non-persistent workers, which are started every epoch).
    """

    def __init__(self, data_source: Sized, seed: int, epoch: int = 0) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.worker_generator = torch.Generator()
        self.worker_generator.manual_seed(mix_seed(self.seed, self.epoch, WORKER_STREAM))

    def set_epoch(self, epoch: int) -> None:
        # called again for the epoch the loader was created in (after a resume): keep the
        # worker generator as it is, since that epoch's iterator has already drawn from it
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.worker_generator.manual_seed(mix_seed(self.seed, self.epoch, WORKER_STREAM))

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, SHUFFLE_STREAM))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()
