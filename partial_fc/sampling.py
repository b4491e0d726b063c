"""Partial-FC negative sampling: which of this rank's classes join a step.

Each rank keeps every class that appears among the step's (global) labels and
fills up to ``max(num_positive, round(sample_rate * num_local))`` classes with
negatives drawn uniformly at random. The draw is seeded by
``(seed, step, class_start)``, so it is reproducible, independent of the
process's global RNG, and the same after a resume at any world size for the
same class range.
"""

from __future__ import annotations

import numpy as np
import torch


def num_sampled_classes(num_positive: int, num_local: int, sample_rate: float) -> int:
    """How many of ``num_local`` classes a step uses: ``max(num_positive,
    round(sample_rate * num_local))`` (Python's round, half to even), never more
    than ``num_local``."""
    return min(num_local, max(num_positive, round(sample_rate * num_local)))


def sampling_generator(
    seed: int, step: int, class_start: int, device: torch.device
) -> torch.Generator:
    """A generator seeded from ``(seed, step, class_start)`` by a SeedSequence, so
    nearby steps and ranks get unrelated streams."""
    state = np.random.SeedSequence([seed, step, class_start]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def sample_classes(
    positive: torch.Tensor, sample_rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Choose the classes of one step.

    Args:
        positive: ``(C,)`` bool, True for local classes among the step's labels.
        sample_rate: fraction of the ``C`` local classes to use.
        generator: source of randomness for the negatives (on ``positive``'s device).

    Returns:
        ``(S,)`` int64 local class indices in increasing order, every positive
        class included, ``S = num_sampled_classes(positive.sum(), C, sample_rate)``.
    """
    num_local = positive.shape[0]
    num_positive = int(positive.sum())
    count = num_sampled_classes(num_positive, num_local, sample_rate)
    if count == num_local:
        return torch.arange(num_local, device=positive.device)
    # Positives score 2, above every uniform draw in [0, 1), so top-k keeps them all.
    scores = torch.rand(num_local, generator=generator, device=positive.device)
    scores.masked_fill_(positive, 2.0)
    chosen = torch.topk(scores, count, sorted=False).indices
    return torch.sort(chosen).values
