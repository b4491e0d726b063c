"""Checks declared on the configuration's field types, applied by one validator.

A field's valid values are written once, in its annotation:

* ``Literal["a", "b"]``: the value is one of those;
* ``Annotated[float, Range(gt=0, finite=True, why="...")]``: a number within bounds;
* ``Annotated[str, OneOf(names)]``: one of the names a registry holds when checked.

:func:`field_problem` reads them for one value; ``configs.schema``'s sections run it over
every field, so a value from a preset, a ``.json``/``.toml`` file or an override is checked
the same way, and the message names the option, what it must be and why.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _show(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _listing(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


@dataclass(frozen=True)
class Range:
    """The valid numbers of a field: ``gt``/``ge`` and ``lt``/``le`` bounds (None: none),
    ``finite`` (no NaN or infinity; implied by a lower and an upper bound together).

    The message reads ``must be [what ]<bounds>[ unit][, or null]<why>``: ``what`` names
    the kind of value (``a fraction``), ``text`` replaces the bounds where a formula reads
    better than the number (``in [0, 2**32)``), ``why`` follows after ``: `` (or a space,
    when it opens with a parenthesis)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    finite: bool = False
    what: str = ""
    unit: str = ""
    text: str = ""
    why: str = ""

    def holds(self, value: Any) -> bool:
        if not _number(value) or (self.finite and not math.isfinite(value)):
            return False
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )

    def rule(self) -> str:
        low = f"({_show(self.gt)}" if self.gt is not None else None
        low = f"[{_show(self.ge)}" if self.ge is not None else low
        high = f"{_show(self.lt)})" if self.lt is not None else None
        high = f"{_show(self.le)}]" if self.le is not None else high
        bounds = []
        if self.text:
            bounds.append(self.text)
        elif low and high and not self.finite:
            bounds.append(f"in {low}, {high}")
        else:
            if low:
                bounds.append(f"{'>' if low[0] == '(' else '>='} {low[1:]}")
            if high:
                bounds.append(f"{'<' if high[-1] == ')' else '<='} {high[:-1]}")
        parts = (["finite"] if self.finite else []) + bounds
        text = " ".join(p for p in (self.what, _listing(parts), self.unit) if p)
        return f"must be {text}"


@dataclass(frozen=True)
class OneOf:
    """A string field whose valid values a registry holds: ``names()`` is called when the
    value is checked, so names registered after this module loaded count."""

    names: Callable[[], Iterable[str]]


def _choices(message: str, choices: Iterable[Any]) -> str:
    return f"{message} {', '.join(map(str, choices))}"


def field_problem(value: Any, hint: Any) -> str | None:
    """What is wrong with ``value`` for a field annotated ``hint`` (``get_type_hints(...,
    include_extras=True)``): ``"must be ... (got ...)"``, or None."""
    checks: tuple[Any, ...] = ()
    if get_origin(hint) is Annotated:
        hint, *extras = get_args(hint)
        checks = tuple(extras)
    nullable = False
    if get_origin(hint) in (typing.Union, types.UnionType):
        members = get_args(hint)
        nullable = type(None) in members
        if value is None and nullable:
            return None
        literal = [m for m in members if get_origin(m) is Literal]
        hint = literal[0] if len(literal) == 1 else hint
    rule = None
    if get_origin(hint) is Literal and value not in get_args(hint):
        rule = _choices("must be one of", get_args(hint))
    for check in checks:
        if rule is not None:
            break
        if isinstance(check, Range) and not check.holds(value):
            rule = check.rule() + (", or null" if nullable else "")
            if check.why:
                rule += (" " if check.why.startswith("(") else ": ") + check.why
        elif isinstance(check, OneOf) and value not in tuple(check.names()):
            rule = _choices("must be one of", check.names())
    return None if rule is None else f"{rule} (got {value!r})"
