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

The rate may change between steps on a schedule (:func:`parse_rate_schedule`, a pure
function of the step: :func:`scheduled_rate`): S stays fixed within each phase, and a
linear ramp is quantised into at most :data:`MAX_RATE_PHASES` phases.

The draw is seeded by ``(seed, step, class_start)``, so it is reproducible,
independent of the process's global RNG, and the same after a resume at any
world size for the same class range.
"""

from __future__ import annotations

import bisect
import math

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


#: The most phases a sampling schedule may have: each phase is one more set of shapes
#: (a new sampled count S per rank), so a ramp is quantised into a few steps, not one
#: phase per training step.
MAX_RATE_PHASES = 32

RatePhases = tuple[tuple[int, float], ...]
"""A sampling schedule: ``((start_step, rate), ...)``, the first starting at step 0,
steps strictly increasing; a phase lasts until the next one starts."""


def parse_rate_schedule(
    spec: str, base_rate: float, name: str = "sample_rate_schedule"
) -> RatePhases:
    """The phases of a sampling-rate schedule written as ``spec``.

    ``spec`` is a comma-separated list of breakpoints ``RATE@STEP`` (the rate from that
    optimizer step on; steps strictly increasing, rates in (0, 1]), and between two
    breakpoints optionally ``ramp:N``: a linear ramp quantised into N phases of equal
    length, phase i (0 <= i < N) starting at ``s0 + (i * (s1 - s0)) // N`` with rate
    ``r0 + (r1 - r0) * i / N``; ``r1`` starts at ``s1``. Before the first breakpoint the
    rate is ``base_rate``. An empty ``spec``: ``base_rate`` throughout.

    ``"1.0@9000"`` with ``base_rate=0.2``: 0.2 until step 8999, the full softmax from step
    9000 (LVFace's recipe). ``"0.1@0,ramp:4,1.0@8000"``: 0.1, 0.325, 0.55, 0.775 from steps
    0, 2000, 4000, 6000, and 1.0 from step 8000.

    Raises ``ValueError`` opening with ``name`` for a malformed spec, a rate outside
    (0, 1], steps not increasing, a ramp not between two breakpoints or longer than its
    steps, or more than :data:`MAX_RATE_PHASES` phases.
    """

    def bad(rule: str) -> ValueError:
        return ValueError(f"{name}: {rule} (got {spec!r})")

    def rate_ok(rate: float) -> bool:
        return math.isfinite(rate) and 0.0 < rate <= 1.0

    if not rate_ok(float(base_rate)):
        raise bad(f"the base rate {base_rate!r} must be in (0, 1]")
    items = [item.strip() for item in spec.split(",")] if spec.strip() else []
    points: list[tuple[int, float] | int] = []  # breakpoints, and ramps as their N
    for item in items:
        if item.startswith("ramp:"):
            try:
                n = int(item[len("ramp:") :])
            except ValueError:
                raise bad(f"{item!r}: a ramp is 'ramp:N', N a whole number of phases") from None
            if not 1 <= n <= MAX_RATE_PHASES:
                raise bad(f"{item!r}: N must be in [1, {MAX_RATE_PHASES}]")
            if not points or not isinstance(points[-1], tuple):
                raise bad(f"{item!r}: a ramp must follow a RATE@STEP breakpoint")
            points.append(n)
            continue
        rate_text, at, step_text = item.partition("@")
        try:
            rate, step = float(rate_text), int(step_text)
        except ValueError:
            raise bad(f"{item!r}: each item is RATE@STEP (e.g. 1.0@9000) or ramp:N") from None
        if not at or step < 0:
            raise bad(f"{item!r}: each item is RATE@STEP with a step >= 0")
        if not rate_ok(rate):
            raise bad(f"{item!r}: the rate must be in (0, 1]")
        last = next((p for p in reversed(points) if isinstance(p, tuple)), None)
        if last is not None and step <= last[0]:
            raise bad(f"{item!r}: steps must increase (after step {last[0]})")
        points.append((step, rate))
    if points and not isinstance(points[-1], tuple):
        raise bad("a ramp must end at a RATE@STEP breakpoint")
    phases: list[tuple[int, float]] = []
    if not points or points[0][0] > 0:  # type: ignore[index]
        phases.append((0, float(base_rate)))
    for i, point in enumerate(points):
        if isinstance(point, tuple):
            phases.append(point)
            continue
        (s0, r0), (s1, r1) = phases[-1], points[i + 1]  # type: ignore[misc]
        if s1 - s0 < point:
            raise bad(f"ramp:{point} needs at least {point} steps between {s0} and {s1}")
        phases.pop()
        phases.extend(
            (s0 + (k * (s1 - s0)) // point, r0 + (r1 - r0) * k / point) for k in range(point)
        )
    if len(phases) > MAX_RATE_PHASES:
        raise bad(f"{len(phases)} phases; at most {MAX_RATE_PHASES} (fewer ramp phases)")
    return tuple(phases)


def scheduled_rate(phases: RatePhases, step: int) -> float:
    """The sampling rate of optimizer step ``step`` (>= 0) under ``phases``: a pure
    function of the step, decided on the host."""
    starts = [start for start, _ in phases]
    return phases[bisect.bisect_right(starts, step) - 1][1]
