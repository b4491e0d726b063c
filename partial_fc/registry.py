"""The margins by name: each entry declares its class, the options it reads and what the
triton backend makes of it. A new margin is one class plus one :func:`register_margin`.

The configuration validates ``head.loss`` against :func:`margin_names`,
``trainer.build`` builds ``head.loss`` with :func:`build_margin`, and
:mod:`partial_fc.backend` asks :func:`entry_of` whether the triton kernels can run a
margin. Options are read by name from a mapping (a ``HeadConfig``'s fields), so an entry
is all the configuration needs to know of a margin.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from partial_fc.batch_margins import AdaFace, BatchMargin, CurricularFace, ElasticFace, MagFace
from partial_fc.margins import ArcFace, CombinedMargin, CosFace, MarginSpec, SphereFace


@dataclass(frozen=True)
class MarginEntry:
    """One registered margin."""

    name: str
    """The ``head.loss`` value that selects it."""
    cls: type[CombinedMargin]
    """The margin class (a :class:`~partial_fc.batch_margins.BatchMargin` for margins that
    read the batch)."""
    options: Mapping[str, str]
    """Constructor argument -> the option that sets it (a ``head.*`` field name)."""
    per_class: str | None = None
    """The argument that per-class margins (``head.margins_file``) replace; None: the
    margin takes none."""
    triton: bool = True
    """Whether the triton backend's kernels run this margin."""
    no_triton_why: str = ""
    """Why they do not (``triton`` False)."""

    @property
    def batch_aware(self) -> bool:
        """The margin reads batch statistics (its margins come from the batch)."""
        return issubclass(self.cls, BatchMargin)

    def arguments(
        self, values: Mapping[str, Any], per_class: MarginSpec | None = None
    ) -> dict[str, Any]:
        """The constructor's keyword arguments from the options ``values`` (field name ->
        value), with ``per_class`` margins (a ``.txt`` file, one per class) in place of
        :attr:`per_class`'s option."""
        kwargs = {arg: values[option] for arg, option in self.options.items()}
        if per_class is not None:
            if self.per_class is None:
                raise ValueError(
                    f"per_class: per-class margins do not apply to {self.name} (its margins "
                    "come from the batch)"
                )
            kwargs[self.per_class] = per_class
        return kwargs


_MARGINS: dict[str, MarginEntry] = {}


def register_margin(
    name: str,
    cls: type[CombinedMargin],
    options: Mapping[str, str] | Iterable[str],
    *,
    per_class: str | None = None,
    no_triton_why: str = "",
) -> MarginEntry:
    """Register ``cls`` as ``head.loss=name``. ``options`` maps each constructor argument to
    the option that sets it (an iterable of names: each argument is the option of its own
    name); ``per_class`` names the argument per-class margins replace; ``no_triton_why``,
    if given, says why the triton kernels cannot run the margin."""
    if name in _MARGINS:
        raise ValueError(f"a margin named {name!r} is registered already")
    if not (isinstance(cls, type) and issubclass(cls, CombinedMargin)):
        raise TypeError(f"a margin class derives from CombinedMargin, got {cls!r}")
    options = dict(options) if isinstance(options, Mapping) else {o: o for o in options}
    if per_class is not None and per_class not in options:
        raise ValueError(f"per_class={per_class!r} is not one of the options {list(options)}")
    entry = MarginEntry(name, cls, options, per_class, not no_triton_why, no_triton_why)
    _MARGINS[name] = entry
    return entry


def unregister_margin(name: str) -> None:
    """Remove ``name`` (a margin registered for a test)."""
    del _MARGINS[name]


def margin_names() -> tuple[str, ...]:
    """The registered ``head.loss`` names, in registration order."""
    return tuple(_MARGINS)


def margin_entry(name: str) -> MarginEntry:
    """The entry of ``name``; ``ValueError`` naming the registered ones otherwise."""
    try:
        return _MARGINS[name]
    except KeyError:
        raise ValueError(f"unknown margin {name!r}; registered: {', '.join(_MARGINS)}") from None


def entry_of(margin: nn.Module) -> MarginEntry | None:
    """The entry of ``margin``'s class or of its nearest registered base class."""
    for cls in type(margin).__mro__:
        for entry in _MARGINS.values():
            if entry.cls is cls:
                return entry
    return None


def build_margin(
    name: str, values: Mapping[str, Any], *, per_class: MarginSpec | None = None
) -> CombinedMargin:
    """The margin ``name`` with its options read from ``values`` (see
    :meth:`MarginEntry.arguments`); its constructor checks them (``ValueError`` naming its
    arguments; an unreadable ``per_class`` file raises ``OSError``)."""
    entry = margin_entry(name)
    return entry.cls(**entry.arguments(values, per_class))


def check_margin_options(
    name: str,
    values: Mapping[str, Any],
    *,
    per_class: MarginSpec | None = None,
    prefix: str = "",
    per_class_option: str = "margins_file",
) -> None:
    """Run the margin's own checks of ``values`` (it is built and dropped) and raise
    ``ValueError`` naming the options (``prefix`` + field name; the per-class margins
    ``prefix + per_class_option``) where its constructor names its arguments."""
    entry = margin_entry(name)
    try:
        build_margin(name, values, per_class=per_class)
    except ValueError as exc:
        names = {arg: f"{prefix}{option}" for arg, option in entry.options.items()}
        names["per_class"] = f"{prefix}{per_class_option}"
        if per_class is not None and entry.per_class is not None:
            names[entry.per_class] = names["per_class"]
        raise ValueError(_name_options(str(exc), names, entry, prefix)) from None


def _name_options(message: str, names: dict[str, str], entry: MarginEntry, prefix: str) -> str:
    """``message`` with the arguments it names replaced by their options: the argument it
    opens with, and elsewhere those whose option has another name (``t_alpha`` ->
    ``head.ema_alpha``; ``margin`` inside an explanation stays a word). A message that
    opens with no argument is prefixed with ``head.loss=<name>``."""
    lead = re.match(r"\w+", message)
    if lead and lead.group() in names and message[lead.end() : lead.end() + 1] in (":", " "):
        message = names[lead.group()] + message[lead.end() :]
    else:
        message = f"{prefix}loss={entry.name}: {message}"
    for arg, option in entry.options.items():
        if option != arg:
            message = re.sub(rf"(?<![.\w]){re.escape(arg)}\b", f"{prefix}{option}", message)
    return message


_ANGULAR = ("scale", "margin", "easy_margin", "straight_through")
register_margin("arcface", ArcFace, _ANGULAR, per_class="margin")
register_margin("cosface", CosFace, ("scale", "margin", "straight_through"), per_class="margin")
register_margin(
    "sphereface",
    SphereFace,
    {
        "scale": "scale",
        "margin": "margin",
        "annealing": "sphereface_annealing",
        "straight_through": "straight_through",
    },
    per_class="margin",
)
register_margin(
    "combined",
    CombinedMargin,
    ("scale", "m1", "m2", "m3", "easy_margin", "straight_through"),
    per_class="m2",
)
register_margin(
    "adaface",
    AdaFace,
    {"scale": "scale", "margin": "margin", "h": "adaface_h", "t_alpha": "ema_alpha"},
)
register_margin(
    "magface",
    MagFace,
    {
        "scale": "scale",
        "l_a": "magface_l_a",
        "u_a": "magface_u_a",
        "l_m": "magface_l_m",
        "u_m": "magface_u_m",
        "lambda_g": "magface_lambda_g",
    },
)
register_margin(
    "curricular",
    CurricularFace,
    {"scale": "scale", "margin": "margin", "t_alpha": "ema_alpha"},
    no_triton_why="its hard negatives change non-target logits",
)
register_margin(
    "elastic",
    ElasticFace,
    {
        "scale": "scale",
        "margin": "margin",
        "std": "elastic_std",
        "kind": "elastic_kind",
        "plus": "elastic_plus",
    },
)
