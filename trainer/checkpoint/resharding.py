"""Class-sharded state split by rank on save and merged by global class on load.

A module sharded by class (the Partial-FC head, the centre loss's centres) holds on
each rank the classes ``[class_start, class_start + num_local)``, ``K`` rows per class
(sub-centres): its row-indexed tensors have shape ``(num_local * K, ...)`` and row
``r`` belongs to global row ``class_start * K + r``. Its optimizer has exactly one
parameter (the rows), whose per-parameter state (``momentum_buffer``, ``exp_avg``,
``exp_avg_sq``, ``row_step``) is row-indexed the same way.

A *shard state* (:func:`shard_state`) is one rank's rows, tagged with their global
range, as a plain dict::

    class_start, num_local, num_subcenters   this rank's classes and K
    row_start, rows                           class_start * K, num_local * K
    model                                     the module's state_dict (CPU tensors)
    model_row_keys                            its row-indexed entries
    optim_state                               the optimizer's per-parameter state
    optim_row_keys                            its row-indexed entries (first dim == rows)
    param_groups                              the optimizer's groups (hyper-parameters)

Entries that are not row-indexed (step counters, per-class margins, which every rank
holds whole) are replicated: :func:`reshard` takes them from the first shard read.
The keys are part of checkpoint format 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _row_keys(tensors: dict[str, Any], rows: int) -> list[str]:
    """The entries of ``tensors`` whose first dimension is ``rows``."""
    return [
        k
        for k, v in tensors.items()
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows
    ]


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def shard_state(
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    class_start: int,
    num_local: int,
    num_subcenters: int,
    row_keys: tuple[str, ...] = ("weight",),
) -> dict[str, Any]:
    """This rank's rows of ``module`` and ``optimizer`` as a shard state (see the
    module docstring), on the CPU.

    Args:
        module: holds ``(num_local * num_subcenters, ...)`` tensors under ``row_keys``.
        optimizer: the optimizer of its one row parameter; ``None`` if nothing learns.
        class_start, num_local, num_subcenters: this rank's classes and rows per class.
        row_keys: the module's row-indexed ``state_dict`` entries (``("weight",)`` for
            the head, ``("centers",)`` for the centre loss).
    Raises:
        ValueError: the optimizer holds more than one parameter or group.
    """
    rows = num_local * num_subcenters
    optim = optimizer.state_dict() if optimizer is not None else {"state": {}, "param_groups": []}
    if len(optim["state"]) > 1 or len(optim["param_groups"]) > 1:
        raise ValueError("a sharded module's optimizer must hold exactly one parameter")
    param_state = _to_cpu(next(iter(optim["state"].values()), {}))
    return {
        "class_start": class_start,
        "num_local": num_local,
        "num_subcenters": num_subcenters,
        "row_start": class_start * num_subcenters,
        "rows": rows,
        "model": _to_cpu(module.state_dict()),
        "model_row_keys": list(row_keys),
        "optim_state": param_state,
        "optim_row_keys": _row_keys(param_state, rows),
        "param_groups": optim["param_groups"],
    }


def split_shard(shard: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A shard state as ``(module_state_dict, optimizer_state_dict)`` for
    ``load_state_dict``: the optimizer's one parameter has index 0 (no state at all if
    it never stepped)."""
    optim_state = shard["optim_state"]
    optim = {
        "state": {0: dict(optim_state)} if optim_state else {},
        "param_groups": shard["param_groups"],
    }
    return dict(shard["model"]), optim


def overlapping(
    infos: Sequence[dict[str, Any]], class_start: int, num_local: int
) -> list[dict[str, Any]]:
    """The saved shards (``meta.json`` entries with ``class_start`` and ``num_local``)
    holding classes of ``[class_start, class_start + num_local)``; all of them for a
    range no shard overlaps (an empty range still needs the replicated entries)."""
    lo, hi = class_start, class_start + num_local
    hit = [
        info
        for info in infos
        if max(lo, info["class_start"]) < min(hi, info["class_start"] + info["num_local"])
    ]
    return hit or list(infos)


def reshard(
    shards: Sequence[dict[str, Any]],
    class_start: int,
    num_local: int,
    num_subcenters: int,
    source: str,
) -> dict[str, Any]:
    """Merge saved shard states into the one of classes ``[class_start, class_start +
    num_local)``, whatever world size saved them.

    Args:
        shards: the saved shard states holding rows of that range (:func:`overlapping`),
            in any order; their tensors may be memory-mapped (only the rows needed are
            copied).
        class_start, num_local, num_subcenters: the range wanted and ``K``.
        source: what the shards come from, for the errors (the checkpoint directory).
    Returns:
        a shard state as :func:`shard_state` makes it for that range: every row-indexed
        tensor of shape ``(num_local * K, ...)`` with the saved trailing shape and
        dtype; the replicated entries of the first shard.
    Raises:
        ValueError: a shard lacks a row-indexed entry, or the shards do not cover the
            range (saved for another ``num_classes``).
    """
    K = num_subcenters
    lo, hi = class_start * K, (class_start + num_local) * K
    first = shards[0]
    model_rows = sorted({k for s in shards for k in s["model_row_keys"]})
    optim_rows = sorted({k for s in shards for k in s["optim_row_keys"]})
    model_state = {
        k: (v.clone() if isinstance(v, torch.Tensor) else v)
        for k, v in first["model"].items()
        if k not in model_rows
    }
    optim_state = {k: v for k, v in first["optim_state"].items() if k not in optim_rows}
    templates: dict[tuple[str, str], Any] = {}
    for s in shards:  # a shard with rows tells the trailing shape and dtype
        for k in model_rows:
            templates.setdefault(("model", k), s["model"].get(k))
        for k in optim_rows:
            if k in s["optim_state"]:
                templates.setdefault(("optim", k), s["optim_state"][k])
    out: dict[tuple[str, str], torch.Tensor] = {
        key: torch.zeros((hi - lo, *tmpl.shape[1:]), dtype=tmpl.dtype)
        for key, tmpl in templates.items()
        if tmpl is not None
    }
    covered = 0
    for s in shards:
        s_lo, s_hi = s["row_start"], s["row_start"] + s["rows"]
        a, b = max(lo, s_lo), min(hi, s_hi)
        if a >= b:
            continue
        covered += b - a
        for (part, k), dst in out.items():
            src = s[part if part == "model" else "optim_state"].get(k)
            if src is None:
                raise ValueError(f"{source}: shard at row {s_lo} lacks '{k}'")
            dst[a - lo : b - lo].copy_(src[a - s_lo : b - s_lo])
    if covered != hi - lo:
        raise ValueError(
            f"{source} covers {covered} of rows [{lo}, {hi}): saved for another num_classes?"
        )
    for (part, k), t in out.items():
        (model_state if part == "model" else optim_state)[k] = t
    return {
        "class_start": class_start,
        "num_local": num_local,
        "num_subcenters": K,
        "row_start": lo,
        "rows": hi - lo,
        "model": model_state,
        "model_row_keys": model_rows,
        "optim_state": optim_state,
        "optim_row_keys": [k for (part, k) in out if part == "optim"],
        "param_groups": first["param_groups"],
    }
