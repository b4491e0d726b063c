"""The resume check: what a checkpoint was trained with against this run.

Two sources, both compared before any state is loaded:

* the facts the run records in ``meta.json`` (:class:`Fact`: the number of classes,
  the embedding size, the dataset list), which a resumed run must share;
* the saved configuration, compared option by option (:func:`compare_configs`) with
  the policy each configuration field declares (:mod:`configs.resume_policy`): an
  option declared ``may_change`` takes its new value (logged), any other difference
  is refused with the reason its field declares.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from configs import Config
from configs.resume_policy import DEFAULT_REFUSAL, resume_policies


@dataclass(frozen=True)
class Fact:
    """A property of the run recorded in ``meta.json`` that a resumed run must share.

    ``describe`` formats the saved value for the error, e.g. ``"{} classes"``. ``check``,
    if given, replaces the equality test: ``check(saved, value)`` returns why the
    checkpoint cannot be resumed, or ``None``; ``saved`` is ``None`` for a checkpoint
    that does not record the fact (the check decides what that means). Without
    ``check``, a checkpoint that does not record the fact cannot be resumed: format 2
    records every fact the saving run had."""

    value: Any
    option: str
    describe: str
    check: Callable[[Any, Any], str | None] | None = None

    def problem(self, meta: dict[str, Any], key: str) -> str | None:
        """Why a checkpoint whose ``meta.json`` is ``meta`` cannot be resumed by this
        fact (recorded under ``key``), as ``"<option>: ..."``; ``None`` if it can."""
        if self.check is not None:
            why = self.check(meta.get(key), self.value)
            return None if why is None else f"{self.option}: {why}"
        if key not in meta:
            return (
                f"{self.option}={self.value} but the checkpoint records no {key} "
                f"(its meta.json lacks a fact format 2 records)"
            )
        if meta[key] != self.value:
            return (
                f"{self.option}={self.value} but the checkpoint has "
                f"{self.describe.format(meta[key])}"
            )
        return None


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """``{"section.field": value}`` (one level: ``model.kwargs`` stays one value)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            for name, v in value.items():
                out[f"{key}.{name}"] = v
        else:
            out[key] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare_configs(
    saved: dict[str, Any],
    current: dict[str, Any],
    saved_world: int | None = None,
    world: int | None = None,
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any, str]]]:
    """Compare a checkpoint's configuration with this run's (both as
    ``configs.config_to_dict`` gives them).

    Returns ``(changed, refused)``: ``(option, old, new)`` for each difference the
    option's declared policy allows, ``(option, old, new, why)`` for each it refuses.
    Options only one side knows (added or removed since the checkpoint was written)
    are not compared. With both world sizes given, a P x K sampler must keep its
    global batch (``data.batch_size`` x ranks)."""
    policies = resume_policies(Config)
    old, new = flatten(saved), flatten(current)
    changed: list[tuple[str, Any, Any]] = []
    refused: list[tuple[str, Any, Any, str]] = []
    for key in new:
        if key not in old or _same(old[key], new[key]):
            continue
        policy = policies.get(key)
        if policy is not None and policy.may_change:
            changed.append((key, old[key], new[key]))
        else:
            why = policy.why if policy is not None else DEFAULT_REFUSAL
            refused.append((key, old[key], new[key], why))
    # The P x K sampler's position counts identities per global batch: batch x ranks.
    if (
        new.get("data.sampler") == "pk"
        and old.get("data.sampler") == "pk"
        and saved_world is not None
        and world is not None
        and "data.batch_size" in old
    ):
        before, after = old["data.batch_size"] * saved_world, new["data.batch_size"] * world
        if before != after:
            refused.append(
                (
                    "data.batch_size x world size",
                    f"{old['data.batch_size']} x {saved_world} = {before}",
                    f"{new['data.batch_size']} x {world} = {after}",
                    "the P x K sampler's position counts identities per global batch",
                )
            )
    return changed, refused
