"""Partial-FC negative sampling: which of this rank's classes join a step.

Each rank keeps every class that appears among the step's (global) labels and
fills up with negatives drawn uniformly at random, to a sample size that depends
only on the shapes: ``S = min(num_local, max(round(sample_rate * num_local), B))``
for a global batch of B samples (:func:`num_sampled_classes`). A step's shapes
therefore never depend on its labels: no host synchronisation is needed to size
the sampled block, and the step can be captured in a CUDA graph.

Positives cannot outnumber S: a batch of B samples holds at most ``min(B,
num_local)`` distinct local classes, and S is at least that. The price is paid
only when ``sample_rate * num_local < B`` (small shards, large batches): the step
then uses B classes, more than the rate asks for. ``arcface_torch`` instead uses
``int(sample_rate * num_local)`` classes, or only the positives when they are more
(a data-dependent shape read back on every step). Where it keeps every class, we
keep every class too; elsewhere we may use more negatives than it, never fewer
positives.

The draw is seeded by ``(seed, step, class_start)``, so it is reproducible,
independent of the process's global RNG, and the same after a resume at any
world size for the same class range.
"""

from __future__ import annotations

import numpy as np
import torch


def num_sampled_classes(num_local: int, sample_rate: float, global_batch: int) -> int:
    """How many of ``num_local`` classes a step uses: ``min(num_local,
    max(round(sample_rate * num_local), global_batch))`` (Python's round, half to
    even). At least every distinct label of a ``global_batch``-sample batch fits."""
    return min(num_local, max(round(sample_rate * num_local), global_batch))


def sampling_generator(
    seed: int, step: int, class_start: int, device: torch.device, *stream: int
) -> torch.Generator:
    """A generator seeded from ``(seed, step, class_start, *stream)`` by a
    SeedSequence, so nearby steps and ranks get unrelated streams; ``stream`` (small
    non-negative integers) separates other uses of the same seed and step."""
    entropy = [seed, step, class_start, *stream]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def sample_classes(positive: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Choose the classes of one step, without reading anything back from the device.

    Args:
        positive: ``(C,)`` bool, True for local classes among the step's labels; at
            most ``count`` of them (:func:`num_sampled_classes` guarantees it).
        count: S, the number of classes to use (at most C).
        generator: source of randomness for the negatives (on ``positive``'s device).

    Returns:
        ``(S,)`` int64 local class indices in increasing order, every positive
        class included.
    """
    num_local = positive.shape[0]
    if count >= num_local:
        return torch.arange(num_local, device=positive.device)
    # Positives score 2, above every uniform draw in [0, 1), so top-k keeps them all.
    scores = torch.rand(num_local, generator=generator, device=positive.device)
    scores.masked_fill_(positive, 2.0)
    chosen = torch.topk(scores, count, sorted=False).indices
    return torch.sort(chosen).values
