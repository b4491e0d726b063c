"""Timing and memory figures on the check's device: CUDA events and
``max_memory_allocated`` on a GPU, ``perf_counter`` (and no memory figures) elsewhere."""

from __future__ import annotations

import gc
import itertools
import statistics
from collections.abc import Callable

import torch

from bench.common import peak_growth_mib, seconds_of


class Clock:
    """Times calls on one device: CUDA events on a GPU, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        """Wait for the device's queued work (no-op on the CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds the device spent from the start to the end of ``fn()``."""
        if not self.cuda:
            return seconds_of(fn)
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000.0

    def time_each(self, fn: Callable[[], object], repeats: int) -> list[float]:
        """Seconds of each of ``repeats`` back-to-back calls of ``fn``. On a GPU the host
        never waits between calls (one CUDA event after each, all read at the end), so
        the timings include no pipeline drain a per-call synchronisation would add."""
        if not self.cuda:
            return [seconds_of(fn) for _ in range(repeats)]
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
        marks[0].record()
        for mark in marks[1:]:
            fn()
            mark.record()
        marks[-1].synchronize()
        return [a.elapsed_time(b) / 1000.0 for a, b in itertools.pairwise(marks)]

    def median_s(self, fn: Callable[[], object], repeats: int) -> float:
        """One warm-up call (compiles, allocates), then the median of ``repeats``
        back-to-back timed calls."""
        fn()
        self.sync()
        return statistics.median(self.time_each(fn, repeats))

    def interleaved_medians(
        self, calls: dict[str, Callable[[], object]], repeats: int
    ) -> dict[str, float]:
        """Median seconds of each call, the calls run round-robin ``repeats`` times so
        that clock and thermal drift hit them alike (as
        :func:`bench.common.interleaved_medians` does with host timers)."""
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, fn in calls.items():
                times[name].append(self.time(fn))
        return {name: statistics.median(values) for name, values in times.items()}

    def memory_growth_mib(self, fn: Callable[[], object]) -> float | None:
        """Growth of ``max_memory_allocated`` during one call after a warm-up call, in MiB;
        None on the CPU (resident-set figures there are :mod:`bench.bench_head`'s job)."""
        if not self.cuda:
            fn()  # the same warm-up call as on the GPU, so the timings that follow match
            return None
        return peak_growth_mib(fn, self.device)

    def reset_peak(self) -> None:
        """Start a new ``max_memory_allocated`` window (no-op on the CPU)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        """Peak allocated memory since :meth:`reset_peak`, GiB; None on the CPU."""
        if not self.cuda:
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def release(self) -> None:
        """Free cached blocks so the next measurement starts from the live tensors only."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
