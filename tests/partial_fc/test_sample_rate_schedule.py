"""``head.sample_rate_schedule``: the schedule's phases (a pure function of the step,
piecewise constant, few phases), the sampled count per step on 1-2 gloo ranks, an exact
resume across a phase change, no host sync inside the steps, and bad values refused
naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.dist import DistContext
from configs import Config, ConfigError
from configs.resume_policy import resume_policies
from partial_fc.sampling import (
    MAX_RATE_PHASES,
    num_sampled_classes,
    parse_rate_schedule,
    scheduled_rate,
)
from tests.distributed import device_under_test, run_ranks
from tests.trainer.test_host_sync import _StepSyncs
from tests.trainer.test_trainer import TensorLoader, dataset, gather_state, make_backbone, make_cfg
from trainer.build import build_head
from trainer.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------- the schedule itself


def test_examples() -> None:
    assert parse_rate_schedule("", 0.2) == ((0, 0.2),)
    assert parse_rate_schedule("1.0@9000", 0.2) == ((0, 0.2), (9000, 1.0))
    assert parse_rate_schedule("0.5@0, 1.0@10", 0.2) == ((0, 0.5), (10, 1.0))
    phases = parse_rate_schedule("0.1@0,ramp:4,1.0@8000", 1.0)
    assert [s for s, _ in phases] == [0, 2000, 4000, 6000, 8000]
    assert [r for _, r in phases] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0])
    lvface = parse_rate_schedule("1.0@9000", 0.2)
    assert [scheduled_rate(lvface, s) for s in (0, 8999, 9000, 10**7)] == [0.2, 0.2, 1.0, 1.0]


_rates = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)


@st.composite
def _specs(draw) -> tuple[str, float]:
    """A valid spec: breakpoints at increasing steps, some joined by ramps."""
    n = draw(st.integers(0, 6))
    gaps = draw(st.lists(st.integers(1, 500), min_size=n, max_size=n))
    start = draw(st.integers(0, 3))
    items: list[str] = []
    step = start
    for i, gap in enumerate(gaps):
        if i:
            step += gap
            ramp = draw(st.integers(0, min(gap, 5)))
            if ramp:
                items.append(f"ramp:{ramp}")
        items.append(f"{draw(_rates)!r}@{step}")
    return ",".join(items), draw(_rates)


@settings(max_examples=200, deadline=None)
@given(_specs())
def test_a_schedule_is_piecewise_constant_with_few_phases(case: tuple[str, float]) -> None:
    spec, base = case
    phases = parse_rate_schedule(spec, base)
    starts = [s for s, _ in phases]
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert 1 <= len(phases) <= MAX_RATE_PHASES
    assert all(0.0 < r <= 1.0 for _, r in phases)
    # each breakpoint's rate holds from its step on
    for item in spec.split(","):
        if "@" in item:
            rate, step = item.split("@")
            assert scheduled_rate(phases, int(step)) == float(rate)
    # the rate changes only where a phase starts, and is constant within a phase
    last = starts[-1] + 3
    rates = [scheduled_rate(phases, s) for s in range(last)]
    for s in range(1, last):
        if rates[s] != rates[s - 1]:
            assert s in starts
    for (s0, r), s1 in zip(phases, [*starts[1:], last], strict=True):
        assert set(rates[s0:s1]) == {r}
    # a pure function of the step: parsing again gives the same phases
    assert parse_rate_schedule(spec, base) == phases


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("1.5@10", "rate must be in (0, 1]"),
        ("0@10", "rate must be in (0, 1]"),
        ("nan@10", "rate must be in (0, 1]"),
        ("0.5@10,1.0@10", "steps must increase"),
        ("0.5@10,1.0@5", "steps must increase"),
        ("0.5@-1", "step >= 0"),
        ("0.5", "RATE@STEP"),
        ("0.5@x", "RATE@STEP"),
        ("ramp:3,1.0@100", "a ramp must follow"),
        ("0.1@0,ramp:3", "a ramp must end"),
        ("0.1@0,ramp:0,1.0@100", "N must be in"),
        ("0.1@0,ramp:x,1.0@100", "ramp:N"),
        ("0.1@0,ramp:5,1.0@3", "needs at least 5 steps"),
        ("0.1@0,ramp:32,0.5@100,ramp:32,1.0@200", "at most 32"),
    ],
)
def test_bad_schedules_are_refused_naming_the_option(tmp_path: Path, spec: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"^head\.sample_rate_schedule: ") as info:
        make_cfg(tmp_path, f"head.sample_rate_schedule={spec}")
    assert why in str(info.value)


def test_the_option_may_change_on_resume() -> None:
    assert resume_policies(Config)["head.sample_rate_schedule"].may_change


# ----------------------------------------------------------------- in training

CLASSES = 200  # labels use 11 of them: most classes are negatives only
SCHEDULE = ("head.sample_rate=0.3", "head.sample_rate_schedule=0.6@2,1.0@4")


def _trainer(rank: int, world: int, out: str, batch: int, *extra: str) -> Trainer:
    x, y = dataset()
    cfg = make_cfg(out, f"data.num_classes={CLASSES}", f"data.batch_size={batch}", *extra)
    ctx = DistContext.current(device_under_test())
    head = build_head(cfg, ctx.device)
    return Trainer(cfg, make_backbone(0.2), head, TensorLoader(x, y, batch, rank, world), ctx)


def _sampled_counts(rank: int, world: int, out: str) -> dict:
    t = _trainer(rank, world, out, 8, *SCHEDULE, "train.max_steps=6")
    counts: list[tuple[int, int]] = []
    real = t.train_step

    def train_step(micro):
        step = t.step
        result = real(micro)
        sampled = t.head.last_sampled
        counts.append((step, t.head.num_local if sampled is None else sampled.shape[0]))
        return result

    t.train_step = train_step  # type: ignore[method-assign]
    t.fit()
    return {"counts": counts, "num_local": t.head.num_local}


@pytest.mark.parametrize("world", [1, 2])
def test_the_head_samples_the_scheduled_count_at_each_step(tmp_path: Path, world: int) -> None:
    phases = parse_rate_schedule("0.6@2,1.0@4", 0.3)
    for r in run_ranks(_sampled_counts, world, str(tmp_path)):
        num_local = r["num_local"]
        expected = [
            (s, num_sampled_classes(num_local, scheduled_rate(phases, s), 8 * world))
            for s in range(6)
        ]
        assert r["counts"] == expected
        # the phases really differ: 0.3, 0.6 and every class
        assert [c for _, c in r["counts"]] == [
            round(0.3 * num_local), round(0.3 * num_local),
            round(0.6 * num_local), round(0.6 * num_local), num_local, num_local,
        ]  # fmt: skip


# 96 samples, global batch 24 -> 4 steps per epoch; 3 epochs -> 12 steps. Phases 0.3,
# 0.45 (step 2), 0.6 (step 4), 1.0 (step 8); the split run stops after 5 steps.
RESUME_ARGS = (
    "train.epochs=3",
    "optimizer.name=sgd",
    "head.sample_rate=0.3",
    "head.sample_rate_schedule=0.3@0,ramp:2,0.6@4,1.0@8",
)


def _run(rank: int, world: int, out: str, *extra: str) -> dict:
    t = _trainer(rank, world, out, 12, *RESUME_ARGS, *extra)
    t.maybe_resume()
    start = t.step
    t.fit()
    return {
        "state": gather_state(t),
        "step": t.step,
        "start": start,
        "rate": t.head.sample_rate,
        "head_steps": t.head.num_steps,
    }


def _resume_equality(rank: int, world: int, tmp: str) -> tuple[dict, dict]:
    full = _run(rank, world, f"{tmp}/full")
    _run(rank, world, f"{tmp}/split", "train.max_steps=5")
    resumed = _run(rank, world, f"{tmp}/split")
    return full, resumed


def test_resume_across_a_phase_change_is_exact(tmp_path: Path) -> None:
    """12 steps == 5 steps (mid-phase 0.6) + resume + 7 steps (into phase 1.0), bit for
    bit: the rate is a function of the step, the head's draws of (seed, its step)."""
    full, resumed = run_ranks(_resume_equality, 2, str(tmp_path))[0]
    assert full["step"] == resumed["step"] == 12
    assert resumed["start"] == 5
    assert full["rate"] == resumed["rate"] == 1.0
    assert full["head_steps"] == resumed["head_steps"] == 12
    for key, value in full["state"].items():
        assert torch.equal(value, resumed["state"][key]), key


def _syncs(rank: int, world: int, tmp: str) -> dict:
    t = _trainer(
        rank, world, tmp, 8, *SCHEDULE, "train.max_steps=6", "log.every_steps=3",
        "eval.at_start=false",
    )  # fmt: skip
    counter = _StepSyncs.watching(t, 3, last_step=6)
    real = t.train_step

    def train_step(micro):
        counter.allowed = False  # from the first step on: start-up may read back
        return real(micro)

    t.train_step = train_step  # type: ignore[method-assign]
    counter.allowed = True
    with counter:
        t.fit()
    return {"syncs": counter.host_syncs, "allowed": counter.allowed_syncs, "step": t.step}


@pytest.mark.parametrize("world", [1, 2])
def test_phase_changes_never_read_back_inside_steps(tmp_path: Path, world: int) -> None:
    for r in run_ranks(_syncs, world, str(tmp_path)):
        assert r["step"] == 6
        assert r["syncs"] == [], r["syncs"]
        assert r["allowed"] > 0  # the counter was live
