"""What the GPU check runs: its sections in order, their sizes and time caps (one plan
for the GPU, one for the CPU smoke run), and the overall budget the caps fit in."""

from __future__ import annotations

import dataclasses
import time

from bench.gpu_check.goals import load_goals

SECTIONS = ("head", "triton", "train", "loader", "tests")
# The whole check's wall-time goal (issue 13: 8 minutes) is also its budget.
TOTAL_BUDGET_S = load_goals()["whole_check"].limit
# Kept free at the end of the budget for writing the report.
REPORT_RESERVE_S = 10.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and time caps of one mode (the GPU check or the CPU smoke run)."""

    head_classes: tuple[int, ...]
    head_batch: int
    head_dim: int
    head_rates: tuple[float, ...]
    head_repeats: int
    head_cap_s: float
    head_backends: tuple[str, ...]
    triton_classes: int
    triton_batch: int
    triton_dim: int
    triton_candidates: int  # of each kernel's candidate list, the first this many
    triton_repeats: int
    triton_cap_s: float
    train_networks: tuple[str, ...]
    train_batch: int
    train_classes: int
    train_warmup: int
    train_steps: int
    train_cap_s: float
    loader_identities: int
    loader_images_per_identity: int
    loader_workers: tuple[int, ...]
    loader_batch: int
    loader_batches: int
    loader_cap_s: float
    tests_cap_s: float
    tests_collect_only: bool

    def cap_s(self, section: str) -> float:
        """The time cap of ``section`` (one of :data:`SECTIONS`), seconds."""
        return getattr(self, f"{section}_cap_s")


GPU_PLAN = Plan(
    head_classes=(65_536, 262_144),
    head_batch=1024,
    head_dim=512,
    head_rates=(1.0, 0.1),
    head_repeats=10,
    head_cap_s=60.0,
    head_backends=("torch", "triton"),
    triton_classes=262_144,
    triton_batch=1024,
    triton_dim=512,
    triton_candidates=8,
    triton_repeats=5,
    triton_cap_s=60.0,
    train_networks=("r50", "r100"),
    train_batch=256,
    train_classes=100_000,
    train_warmup=15,  # cudnn.benchmark tries its algorithms in the first steps
    train_steps=30,
    train_cap_s=120.0,
    # 32,000 JPEGs (~125 batches of 256 per epoch): a few seconds to render on 14 cores
    loader_identities=800,
    loader_images_per_identity=40,
    loader_workers=(8, 14),
    loader_batch=256,
    loader_batches=150,
    loader_cap_s=60.0,
    tests_cap_s=150.0,  # the five caps add up to 450 s, inside the 480 s budget
    tests_collect_only=False,
)

SMOKE_PLAN = Plan(
    head_classes=(2_000,),
    head_batch=32,
    head_dim=64,
    head_rates=(1.0, 0.1),
    head_repeats=2,
    head_cap_s=60.0,
    head_backends=("torch",),  # the interpreter would take minutes: skipped, and said so
    triton_classes=256,
    triton_batch=32,
    triton_dim=64,
    triton_candidates=1,
    triton_repeats=1,
    triton_cap_s=60.0,
    train_networks=("mbf_tiny",),
    train_batch=4,
    train_classes=500,
    train_warmup=1,
    train_steps=2,
    train_cap_s=60.0,
    loader_identities=16,
    loader_images_per_identity=8,
    loader_workers=(1, 2),
    loader_batch=16,
    loader_batches=4,
    loader_cap_s=60.0,
    tests_cap_s=120.0,
    tests_collect_only=True,  # `make test` runs the suite itself, right after
)


class CapReached(RuntimeError):
    """A section's time cap ran out before all of its measurements were taken."""


def check_cap(deadline: float, what: str) -> None:
    """Raise :class:`CapReached` if ``time.monotonic()`` is past ``deadline``, before
    ``what`` starts."""
    if time.monotonic() > deadline:
        raise CapReached(f"time cap reached before {what}")
