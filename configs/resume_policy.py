"""What a resumed run may change, declared on the configuration fields themselves.

A field says it in its ``metadata``::

    lr: float = field(default=0.1, metadata=MAY_CHANGE)
    seed: int = field(default=0, metadata=refuse("the data order is seeded by it"))

``MAY_CHANGE``: a resume takes the new value from the resumed step on (logged).
``refuse(why)``: a resume with another value is refused, naming ``why``. A field that
declares neither takes its section's declaration (the section's field in
``Config``), and without one anywhere a change is refused ("a resumed run must keep
it"): a new option is fixed on resume until someone decides otherwise.
:func:`resume_policies` lists every dotted key with its policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import get_type_hints

#: The ``metadata`` key of the declaration, and its two values.
ON_RESUME = "on_resume"
MAY_CHANGE_VALUE = "may_change"
REFUSE_VALUE = "refuse"

#: ``metadata`` of an option a resumed run may change.
MAY_CHANGE: Mapping[str, str] = MappingProxyType({ON_RESUME: MAY_CHANGE_VALUE})

#: The reason a refusal gives when no declaration names one.
DEFAULT_REFUSAL = "a resumed run must keep it"


def refuse(why: str) -> Mapping[str, str]:
    """``metadata`` of an option a resumed run must keep, with the reason a refusal
    names."""
    return MappingProxyType({ON_RESUME: REFUSE_VALUE, "why": why})


@dataclass(frozen=True)
class ResumePolicy:
    """Whether a resume may change an option, and if not, why."""

    may_change: bool
    why: str = DEFAULT_REFUSAL


_REFUSED = ResumePolicy(False)


def _declared(f: dataclasses.Field, inherited: ResumePolicy, key: str) -> ResumePolicy:
    value = f.metadata.get(ON_RESUME)
    if value is None:
        return inherited
    if value == MAY_CHANGE_VALUE:
        return ResumePolicy(True, "")
    if value == REFUSE_VALUE:
        return ResumePolicy(False, str(f.metadata.get("why") or DEFAULT_REFUSAL))
    raise ValueError(
        f"{key}: metadata {ON_RESUME}={value!r}; expected {MAY_CHANGE_VALUE!r} or {REFUSE_VALUE!r}"
    )


def resume_policies(
    cls: type, prefix: str = "", inherited: ResumePolicy = _REFUSED
) -> dict[str, ResumePolicy]:
    """The policy of every dotted leaf key of the configuration dataclass ``cls``
    (the keys of ``configs.valid_keys(cls)``, in the same order)."""
    out: dict[str, ResumePolicy] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        policy = _declared(f, inherited, key)
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(resume_policies(hints[f.name], f"{key}.", policy))
        else:
            out[key] = policy
    return out
