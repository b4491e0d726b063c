"""Margin functions: the target logit as a pure function of the target cosine.

A margin maps the cosine ``c = cos(theta)`` between an embedding and its own
class centre to the target logit, and every other class keeps ``scale * c``.
No collectives here: the head applies a margin to the target cosines it owns.

All margins here are :class:`CombinedMargin`, whose target logit is

    scale * (cos(m1 * theta + m2) - m3)

with ``m1`` multiplicative angular (SphereFace), ``m2`` additive angular
(ArcFace) and ``m3`` additive cosine (CosFace) margins, all three honoured
together. Each of ``m1``, ``m2``, ``m3`` is either one float or one value per
class (see :func:`load_margins` and :func:`adaptive_margins`), within the range
where it makes the target harder to reach (:data:`MARGIN_RANGES`, checked by
:func:`check_margin`): ``m1 >= 1``, ``0 <= m2 < pi``, ``0 <= m3 < 2``.

Where ``m1 * theta + m2`` passes pi, ``cos`` would turn back up and reward a
*larger* angle. Two fallbacks keep the logit decreasing in theta:

* ``m1 == 1`` (ArcFace, CosFace, combined): the ArcFace paper's linear fallback
  ``cos(theta) - m2 * sin(m2)`` once ``cos(theta) <= cos(pi - m2)``
  (as ``mmpretrain``'s ``ArcFaceClsHead``);
* ``m1 != 1`` (SphereFace): A-Softmax's monotone extension
  ``psi(theta) = (-1)**k * cos(m1 * theta + m2) - 2k`` with
  ``k = floor((m1 * theta + m2) / pi)``.

``easy_margin=True`` instead applies the angular part only where
``cos(theta) > 0`` and leaves ``cos(theta)`` elsewhere (``m3`` still applies).

Gradients. :meth:`CombinedMargin.target_logit` returns the logit and its
derivative with respect to the cosine. By default that derivative is exact:

    d/dc cos(m1*theta + m2) = m1 * sin(m1*theta + m2) / sin(theta)

(times ``(-1)**k`` on the A-Softmax branches, 1 on the linear and easy-margin
branches), so the head's gradients equal a dense autograd computation of the
same formula. ``sin(theta)`` is floored at 1e-6 so a cosine of exactly +-1 gives
a large finite gradient instead of an infinite one. With
``straight_through=True`` the derivative is taken as ``scale`` (``dphi/dc = 1``):
the loss value is unchanged but the margin is invisible to the gradient, which
is what ``arcface_torch`` does by applying the margin under ``no_grad``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

MarginSpec = float | int | Sequence[float] | torch.Tensor | str | os.PathLike
"""One margin for every class, one per class, or a ``.txt`` file with one per line."""

_SIN_FLOOR = 1e-6


def load_margins(path: str | os.PathLike) -> torch.Tensor:
    """Read per-class margins from a text file, one float per line (class 0 first).

    Blank lines and lines starting with ``#`` are skipped. Raises ``ValueError``
    naming the file and line for anything that is not a finite float.
    """
    values: list[float] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{path}:{line_number}: not a margin value: {text!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"{path}:{line_number}: margin must be finite, got {text!r}")
            values.append(value)
    if not values:
        raise ValueError(f"{path}: no margins found")
    return torch.tensor(values, dtype=torch.float64)


def adaptive_margins(
    class_counts: Sequence[int] | torch.Tensor,
    m_min: float = 0.05,
    m_max: float = 0.5,
    power: float = -0.25,
) -> torch.Tensor:
    """Per-class margins from class sizes (Google Landmark 2020, 3rd place).

    ``m_c = (m_max - m_min) * (f_c - min f) / (max f - min f) + m_min`` with
    ``f_c = n_c ** power``; with the default negative power rare classes get the
    larger margins. A class with no samples counts as one sample. When every
    class has the same count the normalised term is undefined; every class then
    gets ``m_max``, so uniform data reduces to a plain margin of ``m_max``.

    Returns a float64 tensor of ``len(class_counts)`` margins.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError("class_counts must be a non-empty 1-D sequence")
    if bool((counts < 0).any()):
        raise ValueError(f"class_counts must be >= 0, got {counts.min().item()}")
    f = counts.clamp(min=1.0) ** power
    spread = f.max() - f.min()
    if spread == 0:
        return torch.full_like(f, float(m_max))
    return (m_max - m_min) * (f - f.min()) / spread + m_min


def _as_margin_tensor(spec: MarginSpec, name: str) -> torch.Tensor:
    if isinstance(spec, str | os.PathLike):
        values = load_margins(spec)
    else:
        values = torch.as_tensor(spec, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError(f"{name}: no margin values given")
    return values.clone()


# The meaningful range [low, high) of each margin of ``cos(m1*theta + m2) - m3``
# (theta in [0, pi]), what the margin is, and why values outside the range are
# refused: they do not make the target harder to reach, so training would run and
# report falling losses while learning nothing useful.
MARGIN_RANGES: dict[str, tuple[float, float, str, str, str]] = {
    "m1": (
        1.0,
        math.inf,
        ">= 1",
        "the multiplicative angular margin",
        "below 1 it shrinks the angle (cos(m1*theta) > cos(theta)) and rewards the "
        "target; 1 disables it",
    ),
    "m2": (
        0.0,
        math.pi,
        "in [0, pi)",
        "the additive angular margin (radians)",
        "from pi on, theta + m2 is past pi at every angle and the fallback "
        "cos(theta) - m2*sin(m2) adds nothing or rewards the target (m2 = 3.5 trains "
        "to loss 0); below 0 it rewards the target; 0 disables it",
    ),
    "m3": (
        0.0,
        2.0,
        "in [0, 2)",
        "the additive cosine margin",
        "cosines lie in [-1, 1], so from 2 on the target stays below every other class "
        "even at theta = 0; below 0 it rewards the target; 0 disables it",
    ),
}
"""``which: (low, high, range, what it is, why)``: valid values are finite,
``>= low`` and ``< high``."""


def check_scale(scale: float, option: str = "scale") -> None:
    """Raise ``ValueError`` naming ``option`` unless ``scale`` is a positive finite number."""
    try:
        ok = math.isfinite(float(scale)) and float(scale) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{option}: must be a positive finite number (the logit scale s multiplies "
            f"every cosine), got {scale!r}"
        )


def check_margin(which: str, values: MarginSpec, option: str | None = None) -> torch.Tensor:
    """Check margin ``which`` (``"m1"``, ``"m2"`` or ``"m3"``) against
    :data:`MARGIN_RANGES`; return its values as a new float64 tensor.

    ``values`` is anything a margin accepts (one value, one per class, a ``.txt``
    file). Raises ``ValueError`` naming ``option`` (default ``which``), the range and
    why, and for per-class values the first class out of range. The margin classes
    and the training configuration (``configs.HeadConfig``) both validate with this.
    """
    if which not in MARGIN_RANGES:
        raise ValueError(f"which must be 'm1', 'm2' or 'm3', got {which!r}")
    option = option or which
    if isinstance(values, str | os.PathLike):
        option = f"{option} (from {os.fspath(values)})"
    tensor = _as_margin_tensor(values, option)
    low, high, limits, role, why = MARGIN_RANGES[which]
    bad = ~(torch.isfinite(tensor) & (tensor >= low) & (tensor < high))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        where = f" for class {index}" if tensor.numel() > 1 else ""
        raise ValueError(
            f"{option}: must be finite and {limits}, got {float(tensor[index]):g}{where} "
            f"({which}, {role} in cos(m1*theta + m2) - m3: {why})"
        )
    return tensor


class CombinedMargin(nn.Module):
    """Target logit ``scale * (cos(m1 * theta + m2) - m3)``; see the module docstring.

    Args:
        scale: the logit scale ``s`` applied to every cosine; positive and finite.
        m1: multiplicative angular margin (SphereFace), >= 1; 1 disables it.
        m2: additive angular margin in radians (ArcFace), in [0, pi); 0 disables it.
        m3: additive cosine margin (CosFace), in [0, 2); 0 disables it.
        easy_margin: apply the angular part only where ``cos(theta) > 0``.
        straight_through: use ``d logit / d cos = scale`` at the target instead of
            the exact derivative (``arcface_torch``'s gradient).

    Each of ``m1``, ``m2``, ``m3`` may be one value or one per class; every value is
    checked against :data:`MARGIN_RANGES` by :func:`check_margin` (a ``ValueError``
    says which and why), and per-class values against the head's ``num_classes`` by
    :meth:`check_num_classes`.
    The margin values are buffers, so they follow ``.to(device)`` and are saved
    in the head's ``state_dict``.
    """

    def __init__(
        self,
        scale: float = 64.0,
        m1: MarginSpec = 1.0,
        m2: MarginSpec = 0.5,
        m3: MarginSpec = 0.0,
        *,
        easy_margin: bool = False,
        straight_through: bool = False,
    ) -> None:
        super().__init__()
        check_scale(scale)
        self.scale = float(scale)
        self._num_classes: int | None = None
        self.easy_margin = bool(easy_margin)
        self.straight_through = bool(straight_through)
        for name, spec in (("m1", m1), ("m2", m2), ("m3", m3)):
            self.register_buffer(name, check_margin(name, spec, self._option(name)))

    # The margin a user tunes for this kind (the subclasses' ``margin`` argument):
    # set_margins() writes it by default.
    primary = "m2"

    @classmethod
    def _option(cls, which: str) -> str:
        """The constructor argument that sets margin ``which`` (for error messages)."""
        return "margin" if cls is not CombinedMargin and which == cls.primary else which

    def set_margins(self, margins: MarginSpec, which: str | None = None) -> None:
        """Replace a margin at run time (``which``: "m1", "m2" or "m3"; default
        this kind's own margin) with one value, one per class, or a ``.txt`` file."""
        which = which or self.primary
        if which not in ("m1", "m2", "m3"):
            raise ValueError(f"which must be 'm1', 'm2' or 'm3', got {which!r}")
        current = getattr(self, which)
        values = check_margin(which, margins, self._option(which)).to(current.device)
        if self._num_classes is not None and values.numel() not in (1, self._num_classes):
            raise ValueError(
                f"{which}: got {values.numel()} margins, expected 1 or num_classes="
                f"{self._num_classes}"
            )
        setattr(self, which, values)

    def check_num_classes(self, num_classes: int) -> None:
        """Bind to a head of ``num_classes`` classes; per-class margins must match it."""
        for name in ("m1", "m2", "m3"):
            count = getattr(self, name).numel()
            if count not in (1, num_classes):
                raise ValueError(
                    f"{name}: got {count} per-class margins but num_classes={num_classes}"
                )
        self._num_classes = num_classes

    def _per_target(self, name: str, classes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        values = getattr(self, name).to(dtype)
        return values if values.numel() == 1 else values[classes]

    def angular(
        self, cos: torch.Tensor, classes: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi, dphi/dcos)`` of the angular part ``cos(m1*theta + m2)`` with its
        fallbacks; ``cos`` and ``classes`` are ``(N,)``. ``step`` is unused here."""
        del step
        m1 = self._per_target("m1", classes, cos.dtype)
        m2 = self._per_target("m2", classes, cos.dtype)
        c = cos.clamp(-1.0, 1.0)
        theta = torch.acos(c)
        sin_theta = torch.sqrt((1.0 - c * c).clamp(min=0.0)).clamp(min=_SIN_FLOOR)
        u = m1 * theta + m2
        # A-Softmax branch index k; 0 wherever u stays within [0, pi].
        k = torch.floor(u / math.pi).clamp(min=0.0)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        phi = sign * torch.cos(u) - 2.0 * k
        dphi = sign * m1 * torch.sin(u) / sin_theta
        unit_m1 = m1 == 1.0
        # ArcFace's linear fallback replaces the A-Softmax extension when m1 == 1.
        threshold = torch.where(m2 > 0, torch.cos(math.pi - m2), torch.full_like(m2, -2.0))
        linear = unit_m1 & (c <= threshold)
        phi = torch.where(linear, c - m2 * torch.sin(m2), phi)
        dphi = torch.where(linear, torch.ones_like(dphi), dphi)
        if self.easy_margin:
            plain = c <= 0
            phi = torch.where(plain, c, phi)
            dphi = torch.where(plain, torch.ones_like(dphi), dphi)
        return phi, dphi

    def target_logit(
        self, cos: torch.Tensor, classes: torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target logits and ``d logit / d cos`` for target cosines ``cos`` ``(N,)`` of
        global classes ``classes`` ``(N,)`` at training step ``step``."""
        phi, dphi = self.angular(cos, classes, step)
        logit = self.scale * (phi - self._per_target("m3", classes, cos.dtype))
        if self.straight_through:
            return logit, torch.full_like(logit, self.scale)
        return logit, self.scale * dphi

    def extra_repr(self) -> str:
        def show(t: torch.Tensor) -> str:
            return f"{t.item():g}" if t.numel() == 1 else f"per-class[{t.numel()}]"

        return (
            f"scale={self.scale:g}, m1={show(self.m1)}, m2={show(self.m2)}, m3={show(self.m3)}, "
            f"easy_margin={self.easy_margin}, straight_through={self.straight_through}"
        )


class ArcFace(CombinedMargin):
    """Additive angular margin: ``scale * cos(theta + margin)`` (Deng et al., CVPR 2019)."""

    primary = "m2"

    def __init__(
        self,
        scale: float = 64.0,
        margin: MarginSpec = 0.5,
        *,
        easy_margin: bool = False,
        straight_through: bool = False,
    ) -> None:
        super().__init__(
            scale, 1.0, margin, 0.0, easy_margin=easy_margin, straight_through=straight_through
        )


class CosFace(CombinedMargin):
    """Additive cosine margin: ``scale * (cos(theta) - margin)`` (Wang et al., CVPR 2018)."""

    primary = "m3"

    def __init__(
        self, scale: float = 64.0, margin: MarginSpec = 0.4, *, straight_through: bool = False
    ) -> None:
        super().__init__(scale, 1.0, 0.0, margin, straight_through=straight_through)


class SphereFace(CombinedMargin):
    """Multiplicative angular margin with A-Softmax's monotone extension
    (Liu et al., CVPR 2017), on normalised embeddings times ``scale``.

    The target logit is ``scale * (lam * cos(theta) + psi(theta)) / (1 + lam)``
    with ``psi(theta) = (-1)**k cos(margin * theta) - 2k``. With
    ``annealing=True``, ``lam = max(lambda_min, lambda_base * (1 + gamma * step) ** -power)``
    decays with the training step as in the original A-Softmax recipe (defaults
    from its released configuration); otherwise ``lam = 0``.
    """

    primary = "m1"

    def __init__(
        self,
        scale: float = 64.0,
        margin: MarginSpec = 4.0,
        *,
        annealing: bool = False,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 0.12,
        lambda_power: float = 1.0,
        lambda_min: float = 5.0,
        straight_through: bool = False,
    ) -> None:
        super().__init__(scale, margin, 0.0, 0.0, straight_through=straight_through)
        self.annealing = bool(annealing)
        self.lambda_base = float(lambda_base)
        self.lambda_gamma = float(lambda_gamma)
        self.lambda_power = float(lambda_power)
        self.lambda_min = float(lambda_min)

    def annealing_lambda(self, step: int) -> float:
        """The A-Softmax lambda at ``step`` (0 without annealing)."""
        if not self.annealing:
            return 0.0
        decayed = self.lambda_base * (1.0 + self.lambda_gamma * step) ** (-self.lambda_power)
        return max(self.lambda_min, decayed)

    def angular(
        self, cos: torch.Tensor, classes: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        psi, dpsi = super().angular(cos, classes, step)
        lam = self.annealing_lambda(step)
        if lam == 0.0:
            return psi, dpsi
        c = cos.clamp(-1.0, 1.0)
        return (lam * c + psi) / (1.0 + lam), (lam + dpsi) / (1.0 + lam)
