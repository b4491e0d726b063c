"""A distributed ``P identities x K images`` batch sampler (for triplet-style losses).

Every rank's batch holds P identities with K images each (``P * K`` samples, the
K images of an identity contiguous), and the ranks' identities are disjoint:
one *global batch* holds ``world_size * P`` distinct identities, rank r taking
identities ``[r * P, (r + 1) * P)`` of it. A triplet loss over the gathered batch
(:class:`partial_fc.triplet.TripletLoss`) therefore always finds positives.

Epoch plan (a pure function of ``(labels, seed, epoch, global P, K, policy)``,
computed identically on every rank, so the ranks need not communicate):

1. Each identity's images are shuffled and cut into *groups* of K.
2. An identity with ``n`` images gives ``n // K`` full groups; a remainder of
   ``r = n % K`` images is handled by ``small_identity``:

   * ``"replace"`` (default): the remainder becomes one more group, topped up
     with ``K - r`` of the identity's other images (drawn without replacement
     when ``n >= K``). An identity with fewer than K images gives one group
     topped up by drawing its own images *with replacement* (duplicates get
     different augmentation seeds). Every image is used every epoch.
   * ``"drop"``: remainders are skipped this epoch (different images each epoch,
     because of the reshuffle); identities with fewer than K images are never
     sampled.

3. Group j of every identity goes to *round* j; each round is shuffled and the
   rounds are concatenated, so identities with many images keep appearing after
   the small ones ran out, and one global batch never holds two groups of one
   identity: the groups are packed in order into global batches of ``W * P``
   distinct identities, a group whose identity is already in the batch being
   deferred to the next one. The incomplete last global batch and groups that
   cannot be placed (the tail of over-represented identities) are dropped.

Resume: the position is the number of global batches done in the epoch, so a
checkpoint resumes mid-epoch even with another world size, as long as the
global identity count ``world_size * P`` and K are unchanged.

Items are ``(index, aug_seed)`` like :class:`datasets.sampler.DistributedFaceSampler`;
use a ``DataLoader`` with ``batch_size = P * K`` and ``drop_last=False``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
from torch.utils.data import Sampler

from datasets.sampler import _dist_default

SmallIdentityPolicy = Literal["replace", "drop"]
_POLICIES = ("replace", "drop")
_MASK64 = (1 << 64) - 1


class PKSampler(Sampler[tuple[int, int]]):
    """Per-rank ``P x K`` batches of a seeded, resumable epoch plan (module docstring).

    Args:
        labels: every sample's label, ``(N,)`` non-negative ints
            (:meth:`datasets.dataset.FaceDataset.labels`).
        p: identities per rank and batch (P).
        k: images per identity (K).
        rank, world_size: default to the initialised process group, else ``0`` and ``1``.
        seed: plan seed (same on every rank); epoch e uses ``(seed, e)``.
        small_identity: ``"replace"`` or ``"drop"``, the policy for identities (and
            remainders) with fewer than K images.

    Usage::

        sampler = PKSampler(ds.labels(), p=16, k=4, seed=cfg.seed)
        loader = DataLoader(ds, batch_size=sampler.batch_size, sampler=sampler)
        sampler.set_epoch(epoch)
        ckpt["sampler"] = sampler.state_dict(batches_done=step + 1)
        sampler.load_state_dict(ckpt["sampler"])    # then set_epoch(saved epoch)
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        small_identity: SmallIdentityPolicy = "replace",
    ) -> None:
        rank, world_size = _dist_default(rank, world_size)
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty 1-d sequence, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.min() < 0:
            raise ValueError(f"labels must be >= 0, found {int(labels.min())}")
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be >= 1, got p={p}, k={k}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if small_identity not in _POLICIES:
            raise ValueError(f"small_identity must be one of {_POLICIES}, got {small_identity!r}")
        self.labels = labels.astype(np.int64)
        self.p, self.k = int(p), int(k)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.small_identity = small_identity
        counts = np.bincount(self.labels)
        eligible = int((counts >= (k if small_identity == "drop" else 1)).sum())
        if eligible < self.global_identities:
            raise ValueError(
                f"a global batch needs world_size * p = {self.global_identities} distinct "
                f"identities, but only {eligible} have "
                + (f">= k={k} images" if small_identity == "drop" else "images")
            )
        self.epoch = 0
        self.batches_done = 0  # global batches already trained on in ``epoch``
        self._iter_start = 0
        self._plan: tuple[int, np.ndarray] | None = None

    @property
    def global_identities(self) -> int:
        """Identities per global batch, ``world_size * P``."""
        return self.world_size * self.p

    @property
    def batch_size(self) -> int:
        """Samples per rank and batch, ``P * K`` (the DataLoader's ``batch_size``)."""
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts from its beginning, the current one resumes."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.batches_done = 0

    def mark_epoch_done(self) -> None:
        """Record that the epoch was iterated to its end (see ``FaceLoader``)."""
        self.batches_done = self.batches_per_epoch()

    def plan(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's global batches: int64 ``(num_batches, world_size * P * K)``,
        rank r's batch being columns ``[r * P * K, (r + 1) * P * K)``."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self._make_plan(epoch))
        return self._plan[1]

    def _make_plan(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        k = self.k
        # 1. each identity's images in random order: sort by (label, random key)
        order = np.lexsort((rng.random(len(self.labels)), self.labels))
        counts = np.bincount(self.labels)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ids = np.flatnonzero(counts)
        n, first = counts[ids], starts[ids]
        # 2. groups of K positions into ``order``: full groups, then the remainders
        full = n // k
        group_ident = [np.repeat(ids, full)]
        group_round = [np.arange(full.sum()) - np.repeat(np.cumsum(full) - full, full)]
        group_pos = [np.repeat(first, full * k) + np.arange(full.sum() * k)
                     - np.repeat(np.cumsum(full * k) - full * k, full * k)]  # fmt: skip
        rem = n % k
        if self.small_identity == "replace" and rem.any():
            has = rem > 0
            r_ids, r_n, r_first, r_rem, r_full = ids[has], n[has], first[has], rem[has], full[has]
            slot = np.tile(np.arange(k), len(r_ids))  # position inside the extra group
            owner = np.repeat(np.arange(len(r_ids)), k)
            rem_of, n_of, first_of = r_rem[owner], r_n[owner], r_first[owner]
            # slots < rem: the remainder images; the rest: other images of the identity
            remainder_pos = first_of + n_of - rem_of + slot
            # n >= K: images at the head of the shuffled order (distinct, not in the remainder)
            top_up = first_of + slot - rem_of
            small = n_of < k
            drawn = first_of + (rng.random(len(slot)) * n_of).astype(np.int64)
            top_up = np.where(small, drawn, top_up)
            group_ident.append(r_ids)
            group_round.append(r_full)
            group_pos.append(np.where(slot < rem_of, remainder_pos, top_up))
        group_ident_a = np.concatenate(group_ident)
        group_round_a = np.concatenate(group_round)
        members = order[np.concatenate(group_pos)].reshape(-1, k)
        # 3. rounds in order, shuffled inside, packed into batches of distinct identities
        sequence = np.lexsort((rng.random(len(group_ident_a)), group_round_a))
        batches = _pack_distinct(sequence, group_ident_a, self.global_identities)
        if not batches:
            return np.zeros((0, self.global_identities * k), np.int64)
        return members[np.asarray(batches, np.int64)].reshape(len(batches), -1)

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches per rank in a whole epoch (from its start)."""
        return int(self.plan(epoch).shape[0])

    def __len__(self) -> int:
        """Samples this rank yields in the coming iteration (a multiple of ``P * K``)."""
        return max(self.batches_per_epoch() - self.batches_done, 0) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        plan = self.plan()
        start = self.batches_done
        self._iter_start = start
        width = self.batch_size
        base = ((self.seed & 0xFFFF) << 48) ^ ((self.epoch & 0xFFFF) << 32)
        row_width = plan.shape[1]
        for b in range(start, plan.shape[0]):
            lo = self.rank * width
            for j, idx in enumerate(plan[b, lo : lo + width].tolist()):
                yield idx, (base ^ (b * row_width + lo + j)) & _MASK64

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """Position after ``batches_done`` batches of the current iteration were trained
        on (None: where the current iteration started)."""
        return {
            "epoch": self.epoch,
            "batches_done": self._iter_start + (batches_done or 0),
            "seed": self.seed,
            "num_samples": len(self.labels),
            "global_identities": self.global_identities,
            "k": self.k,
            "small_identity": self.small_identity,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position (world size may differ; ``world_size * P`` and K not)."""
        for key, mine in (
            ("num_samples", len(self.labels)),
            ("seed", self.seed),
            ("global_identities", self.global_identities),
            ("k", self.k),
            ("small_identity", self.small_identity),
        ):
            if state.get(key) != mine:
                raise ValueError(
                    f"PK sampler state has {key}={state.get(key)!r}, this sampler has {mine!r}"
                )
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self._iter_start = self.batches_done


def _pack_distinct(sequence: np.ndarray, ident: np.ndarray, size: int) -> list[list[int]]:
    """Greedily pack groups (in ``sequence`` order) into lists of ``size`` groups of
    distinct identities; a conflicting group waits for the next list. Leftovers drop."""
    ident_list = ident.tolist()
    batches: list[list[int]] = []
    current: list[int] = []
    taken: set[int] = set()
    waiting: list[int] = []

    def add(group: int) -> None:
        nonlocal current, taken
        current.append(group)
        taken.add(ident_list[group])
        if len(current) == size:
            batches.append(current)
            current, taken = [], set()

    for group in sequence.tolist():
        if ident_list[group] in taken:
            waiting.append(group)
            continue
        filled = len(batches)
        add(group)
        while waiting and len(batches) > filled:  # a batch closed: retry the waiting groups
            filled = len(batches)
            still = []
            for w in waiting:
                if ident_list[w] in taken:
                    still.append(w)
                else:
                    add(w)
            waiting = still
    return batches
