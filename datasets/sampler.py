"""A distributed, resumable sampler whose sample order does not depend on the world size.

Every epoch draws one global permutation of ``range(num_samples)`` from ``(seed, epoch)``.
The permutation is consumed in *global batches* of ``world_size * batch_size`` samples; in
global batch ``g``, rank ``r`` takes the ``r``-th slice of ``batch_size`` samples. Hence:

* ranks are disjoint and together see exactly the global batch;
* a run on 1 rank with batch 2B sees the same global batches as 2 ranks with batch B;
* the position is one number, ``consumed`` (global samples done this epoch), so a
  checkpoint can resume mid-epoch, even with another world size or per-rank batch size,
  without repeating or skipping samples.

Last-batch policy: with ``drop_last=True`` (default) the final incomplete global batch of each
epoch is dropped (fewer than ``world_size * batch_size`` samples, different ones every epoch
because of the reshuffle). With ``drop_last=False`` it is completed by wrapping around to the
start of the epoch's permutation, so every rank still gets full batches.

Each yielded item is ``(index, aug_seed)``: the Dataset uses ``aug_seed`` for its random
augmentation (the flip), so augmentation is reproducible and independent of worker count.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from common.dist import rank_and_world_size

_MASK64 = (1 << 64) - 1


def _dist_default(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank``/``world_size`` as given, each ``None`` replaced by the default process
    group's (:func:`partial_fc.collectives.rank_and_world_size`: ``0``/``1`` without one)."""
    group_rank, group_world = rank_and_world_size()
    return (
        group_rank if rank is None else rank,
        group_world if world_size is None else world_size,
    )


class DistributedFaceSampler(Sampler[tuple[int, int]]):
    """Per-rank shard of a seeded global shuffle, resumable mid-epoch.

    Args:
        num_samples: dataset length ``N``.
        batch_size: per-rank batch size ``B`` (the DataLoader must use the same).
        rank, world_size: default to the initialised process group, else ``0`` and ``1``.
        seed: shuffle seed (same on every rank).
        shuffle: ``False`` keeps dataset order (still sharded per global batch).
        drop_last: last-batch policy, see the module docstring.

    Usage::

        sampler.set_epoch(epoch)              # before each epoch
        for step, batch in enumerate(loader): ...
        ckpt["sampler"] = sampler.state_dict(batches_done=step + 1)
        ...
        sampler.load_state_dict(ckpt["sampler"])   # then set_epoch(ckpt epoch) and iterate
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        rank, world_size = _dist_default(rank, world_size)
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0  # global samples already trained on in ``epoch``
        self._iter_start = 0  # ``consumed`` when the current iteration began

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts from its beginning, the current one resumes."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.consumed = 0

    def mark_epoch_done(self) -> None:
        """Record that the epoch was iterated to its end (a checkpoint taken now
        resumes at the next epoch)."""
        self.consumed = self.num_samples

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's global order: int64 tensor ``(num_samples,)``."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + epoch) & ((1 << 63) - 1))
        return torch.randperm(self.num_samples, generator=g)

    def _steps(self) -> int:
        remaining = max(self.num_samples - self.consumed, 0)
        if self.drop_last:
            return remaining // self.global_batch
        return -(-remaining // self.global_batch)

    def __len__(self) -> int:
        """Samples this rank yields in the coming iteration (a multiple of ``batch_size``)."""
        return self._steps() * self.batch_size

    def batches_per_epoch(self) -> int:
        """Full-epoch batch count per rank (from position 0)."""
        n = self.num_samples
        g = self.global_batch
        return n // g if self.drop_last else -(-n // g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        perm = self.permutation()
        start = self.consumed
        self._iter_start = start
        steps = self._steps()
        needed = start + steps * self.global_batch
        if needed > self.num_samples:  # drop_last=False: wrap around for the last batch
            reps = -(-needed // self.num_samples)
            perm = perm.repeat(reps)
        base = ((self.seed & 0xFFFF) << 48) ^ ((self.epoch & 0xFFFF) << 32)
        b, r, g = self.batch_size, self.rank, self.global_batch
        for step in range(steps):
            lo = start + step * g + r * b
            chunk = perm[lo : lo + b].tolist()
            for j, idx in enumerate(chunk):
                yield idx, (base ^ (lo + j)) & _MASK64

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """Position after ``batches_done`` batches of the current iteration were trained on.

        ``batches_done`` counts batches handed to the training loop since the iteration
        began (DataLoader prefetching runs ahead of training, so the sampler cannot know it).
        ``None`` records the position at which the current iteration started.
        """
        consumed = self._iter_start + (batches_done or 0) * self.global_batch
        return {
            "epoch": self.epoch,
            "consumed": min(consumed, self.num_samples),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; world size and batch size may differ from the saver's."""
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples, this dataset has "
                f"{self.num_samples}"
            )
        if int(state["seed"]) != self.seed or bool(state["shuffle"]) != self.shuffle:
            raise ValueError(
                f"sampler state has seed={state['seed']} shuffle={state['shuffle']}, this "
                f"sampler seed={self.seed} shuffle={self.shuffle}"
            )
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self._iter_start = self.consumed
