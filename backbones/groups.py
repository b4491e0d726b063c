"""A backbone's parts by parameter name: the stem, the residual units, the head.

Each model family names its modules as arcface_torch does, and its
:class:`GroupMatcher` (in its registry entry, :func:`backbones.registry.group_matcher`)
says which part every parameter and buffer belongs to:

* the **stem**: the layers before the first unit;
* the **units**: the residual units (blocks) in forward order, each known by its name
  prefix (``layer2.0``, ``layers.3.layers.1``, ``blocks.7``);
* the **head**: the layers after the last unit, which make the embedding.

Freezing (``model.freeze_stem``, ``model.freeze_units``) reads it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["stem", "unit", "head"]


@dataclass(frozen=True)
class BackboneParts:
    """The names of one backbone's parameters by part (:meth:`GroupMatcher.parts`)."""

    stem: list[str]
    """Names in the stem."""
    units: list[str]
    """Unit prefixes in forward order."""
    head: list[str]
    """Names in the head."""


@dataclass(frozen=True)
class GroupMatcher:
    """How one family names its parts. ``stem`` and ``head`` full-match the names of those
    parts; each pattern of ``units`` full-matches names inside a unit, its group 1 being
    the unit's prefix (the first pattern that matches gives it). The three kinds are
    disjoint and every name of the family's models matches one."""

    stem: str
    units: tuple[str, ...]
    head: str

    def kinds(self, name: str) -> list[Kind]:
        """Every kind of part whose patterns match ``name`` (one, for a name of the family)."""
        found: list[Kind] = []
        if re.fullmatch(self.stem, name):
            found.append("stem")
        if any(re.fullmatch(p, name) for p in self.units):
            found.append("unit")
        if re.fullmatch(self.head, name):
            found.append("head")
        return found

    def group(self, name: str) -> str:
        """``"stem"``, ``"head"``, or the prefix of the unit that holds ``name``;
        ``ValueError`` for a name in no part."""
        if re.fullmatch(self.stem, name):
            return "stem"
        for pattern in self.units:
            match = re.fullmatch(pattern, name)
            if match:
                return match.group(1)
        if re.fullmatch(self.head, name):
            return "head"
        raise ValueError(f"{name!r} is in none of the stem, the units and the head")

    def parts(self, names: Iterable[str]) -> BackboneParts:
        """``names`` (in ``named_parameters()`` order, which is forward order in every
        backbone here) by part; ``ValueError`` naming the first that is in none."""
        stem: list[str] = []
        head: list[str] = []
        units: dict[str, None] = {}
        for name in names:
            group = self.group(name)
            if group == "stem":
                stem.append(name)
            elif group == "head":
                head.append(name)
            else:
                units.setdefault(group, None)
        return BackboneParts(stem, list(units), head)


#: arcface_torch's IResNet: ``conv1``/``bn1``/``prelu``, units ``layer1..4.<i>``, then
#: ``bn2``, ``fc``, ``features``.
IRESNET_GROUPS = GroupMatcher(
    stem=r"(conv1|bn1|prelu)\.[^.]+",
    units=(r"(layer[1-4]\.\d+)\..+",),
    head=r"(bn2|fc|features)\.[^.]+",
)

#: arcface_torch's MobileFaceNet: ``layers.0`` (stem), then ``layers.1..7``, where a
#: ``Residual`` holds its units as ``layers.<i>.layers.<j>`` (each a ``DepthWise`` of
#: ``ConvBlock``s, whose children are ``layers.<k>`` too: a unit inside a Residual has
#: four ``layers`` levels down to a parameter); then ``conv_sep`` and ``features`` (GDC).
MOBILEFACENET_GROUPS = GroupMatcher(
    stem=r"layers\.0\..+",
    units=(
        r"(layers\.[1-9]\d*\.layers\.\d+)\.layers\.\d+\.layers\.\d+\.[^.]+",
        r"(layers\.[1-9]\d*)\..+",
    ),
    head=r"(conv_sep|features)\..+",
)

#: ViT: the patch and position embeddings and the mask token (it stands in for masked
#: patches), units ``blocks.<i>``, then ``norm`` and ``feature``.
VIT_GROUPS = GroupMatcher(
    stem=r"patch_embed\..+|pos_embed|mask_token",
    units=(r"(blocks\.\d+)\..+",),
    head=r"(norm|feature)\..+",
)
