"""Margins that read the global batch: AdaFace, MagFace, CurricularFace, ElasticFace.

Published code computes their statistics per GPU. The head gathers the whole
global batch on every rank, so here every statistic is taken over the global
batch's valid samples (padding and ``ignore_index`` rows excluded) and every rank
computes the same value: no rank-dependent EMA, no collective in this module.
What a margin sees of the batch is a :class:`MarginBatch`; what it returns is a
:class:`TargetTerms`. The head's cross-entropy (:mod:`partial_fc.softmax_ce`)
applies the terms and their gradients.

Shapes: B global batch. ``cos`` are target cosines ``(B,)`` (meaningful on the rows
whose class this rank owns), ``norms`` the raw embedding norms ``(B,)``.

Formulas and gradients (``s`` the scale, ``c = cos(theta)`` the target cosine):

* **AdaFace** (Kim et al., CVPR 2022). ``n = clip(|z|, 0.001, 100)`` detached; EMAs
  ``mu <- a * mean(n) + (1 - a) * mu`` and ``sigma <- a * std(n) + (1 - a) * sigma``
  (unbiased std, ``a = t_alpha``; from 20 and 100), updated before use;
  ``g = clip(h * (n - mu) / (sigma + 1e-3), -1, 1)``; the target cosine is clamped to
  ``[-1 + 1e-3, 1 - 1e-3]`` as in the published code, ``theta' = clip(theta - m*g,
  1e-3, pi - 1e-3)``, logit ``s * (cos(theta') - m - m*g)``. Gradient: ``g`` carries
  none; ``d logit / d c = s * sin(theta') / sin(theta)`` inside both clips, 0 outside.
* **MagFace** (Meng et al., CVPR 2021). ``a = clamp(|z|, l_a, u_a)`` with the
  gradient flowing through it; ``m(a) = l_m + (u_m - l_m) (a - l_a) / (u_a - l_a)``;
  logit ``s * cos(theta + m(a))``, or ``s * (c - m sin m)`` once ``c <= cos(pi - m)``
  (ArcFace's fallback). ``d logit / d c = s sin(theta + m) / sin(theta)`` (1 * s on
  the fallback); ``d logit / d a = -s sin(theta + m) m'(a)`` (``-s (sin m + m cos m)
  m'(a)`` on the fallback), 0 where the clamp is active. The loss gains
  ``lambda_g * mean(a / u_a^2 + 1 / a)``, with gradient ``lambda_g (1 / u_a^2 -
  1 / a^2) / N`` per sample.
* **CurricularFace** (Huang et al., CVPR 2020). Target logit as ArcFace.
  ``t <- 0.01... (t_alpha) * mean(c) + (1 - t_alpha) * t`` over the global batch, from
  0, updated before use. Every non-target cosine ``c_j > cos(theta + m)`` (the
  plain formula, without the fallback, as published) becomes ``c_j (t + c_j)``;
  ``t`` carries no gradient, so ``d logit_j / d c_j = s (t + 2 c_j)`` there.
* **ElasticFace** (Boutros et al., CVPRW 2022). Each sample's margin ``m_i ~ N(m,
  std)``, drawn from a generator seeded by ``(seed, step)`` so every rank draws the
  same ``(B,)`` values; with ``plus=True`` the margins are sorted so that the sample
  with the largest target cosine gets the smallest margin. ``kind="arc"``: ArcFace
  with ``m_i`` (and its fallback); ``kind="cos"``: ``s (c - m_i)``. The margins carry
  no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from partial_fc.margins import CombinedMargin
from partial_fc.sampling import sampling_generator

_SIN_FLOOR = 1e-6
# ElasticFace draws its margins from a stream of its own (not the negatives').
_ELASTIC_STREAM = 7


@dataclass(frozen=True)
class MarginBatch:
    """What a batch-aware margin sees of the global batch (identical on every rank)."""

    step: int
    """The head's training step (seeds ElasticFace's draw)."""
    seed: int
    """The head's seed."""
    norms: torch.Tensor
    """``(B,)`` norms of the raw (gathered) embeddings."""
    valid: torch.Tensor
    """``(B,)`` bool: rows that take part in the loss."""
    training: bool
    """A training forward: EMAs update, ElasticFace draws margins."""
    global_cos: torch.Tensor | None = None
    """``(B,)`` every sample's target cosine (all-reduced), for margins that set
    :attr:`BatchMargin.needs_global_cos`; None otherwise."""


@dataclass
class TargetTerms:
    """A margin's contribution to the loss for the target entries (rows: ``(B,)``)."""

    logit: torch.Tensor
    """Target logits."""
    slope: torch.Tensor
    """``d logit / d cos``."""
    norm_slope: torch.Tensor | None = None
    """``d logit / d |z|`` (MagFace), or None."""
    extra_loss: torch.Tensor | None = None
    """0-dim term added to the loss (MagFace's regulariser), same on every rank."""
    extra_norm_grad: torch.Tensor | None = None
    """``(B,)`` ``d extra_loss / d |z|``."""
    hard_threshold: torch.Tensor | None = None
    """``(B,)`` CurricularFace: non-target cosines above it are re-weighted
    (``+inf``: none)."""
    hard_t: torch.Tensor | None = None
    """0-dim CurricularFace ``t``."""


class BatchMargin(CombinedMargin):
    """A margin whose target logit depends on batch statistics (see the module doc).

    Subclasses implement :meth:`batch_target`; ``needs_global_cos`` asks the head for
    every sample's target cosine (one extra all-reduce of ``(B,)`` floats)."""

    needs_global_cos = False

    def batch_target(
        self, cos: torch.Tensor, classes: torch.Tensor, batch: MarginBatch
    ) -> TargetTerms:
        raise NotImplementedError

    def _scalar(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Margin buffer ``name`` (one value) as a 0-dim tensor on its device: read
        as a tensor, never with ``float()``, which would make the host wait for a GPU."""
        return getattr(self, name).to(dtype).reshape(-1)[0]


def _valid_mean(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` over ``valid`` rows and the count (both 0-dim, no host sync)."""
    count = valid.sum()
    total = torch.where(valid, values, 0.0).sum()
    return total / count.clamp(min=1), count


def _ema_(buffer: torch.Tensor, value: torch.Tensor, alpha: float, ok: torch.Tensor) -> None:
    """``buffer <- alpha * value + (1 - alpha) * buffer`` where ``ok``, in place."""
    buffer.copy_(torch.where(ok, alpha * value + (1.0 - alpha) * buffer, buffer))


def _arc(
    cos: torch.Tensor, m: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cos(theta + m)`` with ArcFace's fallback ``c - m sin m`` once ``c <= cos(pi -
    m)``: ``(phi, d phi / d c, d phi / d m)``."""
    m = torch.as_tensor(m, dtype=cos.dtype, device=cos.device)
    c = cos.clamp(-1.0, 1.0)
    theta = torch.acos(c)
    sin_theta = torch.sqrt((1.0 - c * c).clamp(min=0.0)).clamp(min=_SIN_FLOOR)
    linear = c <= torch.where(m > 0, torch.cos(math.pi - m), torch.full_like(m, -2.0))
    phi = torch.where(linear, c - m * torch.sin(m), torch.cos(theta + m))
    dphi_dc = torch.where(linear, torch.ones_like(c), torch.sin(theta + m) / sin_theta)
    dphi_dm = torch.where(linear, -(torch.sin(m) + m * torch.cos(m)), -torch.sin(theta + m))
    return phi, dphi_dc, dphi_dm


class AdaFace(BatchMargin):
    """AdaFace: a margin adapted to image quality through the feature norm."""

    primary = "m2"

    def __init__(
        self, scale: float = 64.0, margin: float = 0.4, h: float = 0.333, t_alpha: float = 0.01
    ) -> None:
        super().__init__(scale, 1.0, margin, 0.0)
        if not (h > 0 and math.isfinite(h)):
            raise ValueError(f"h must be a finite value > 0 (the norm-to-margin gain), got {h}")
        if not 0.0 < t_alpha <= 1.0:
            raise ValueError(f"t_alpha is an EMA weight in (0, 1], got {t_alpha}")
        self.h, self.t_alpha = float(h), float(t_alpha)
        # float64: an EMA over many steps is only as good as its running sum.
        self.register_buffer("batch_mean", torch.tensor(20.0, dtype=torch.float64))
        self.register_buffer("batch_std", torch.tensor(100.0, dtype=torch.float64))

    def batch_target(self, cos, classes, batch):
        m = self._scalar("m2", cos.dtype)
        norms = batch.norms.detach().clamp(0.001, 100.0).to(cos.dtype)
        if batch.training:
            mean, count = _valid_mean(norms, batch.valid)
            var = torch.where(batch.valid, (norms - mean) ** 2, 0.0).sum()
            std = (var / (count - 1).clamp(min=1)).sqrt()
            ok = count > 1  # an unbiased std needs two samples
            _ema_(self.batch_mean, mean.to(self.batch_mean.dtype), self.t_alpha, ok)
            _ema_(self.batch_std, std.to(self.batch_std.dtype), self.t_alpha, ok)
        mean, std = self.batch_mean.to(cos.dtype), self.batch_std.to(cos.dtype)
        g = (self.h * (norms - mean) / (std + 1e-3)).clamp(-1.0, 1.0)
        eps = 1e-3
        c = cos.clamp(-1.0 + eps, 1.0 - eps)
        inside_c = (cos > -1.0 + eps) & (cos < 1.0 - eps)
        theta = torch.acos(c)
        shifted = theta - m * g
        inside_t = (shifted > eps) & (shifted < math.pi - eps)
        theta_m = torch.clamp(shifted, eps, math.pi - eps)
        logit = self.scale * (torch.cos(theta_m) - m - m * g)
        sin_theta = torch.sqrt((1.0 - c * c).clamp(min=0.0)).clamp(min=_SIN_FLOOR)
        slope = self.scale * torch.sin(theta_m) / sin_theta
        return TargetTerms(logit, torch.where(inside_c & inside_t, slope, 0.0))


class MagFace(BatchMargin):
    """MagFace: a margin growing with the feature magnitude, plus its regulariser."""

    primary = "m2"

    def __init__(
        self,
        scale: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
    ) -> None:
        if not 0.0 < l_a < u_a or not math.isfinite(u_a):
            raise ValueError(f"need 0 < l_a < u_a (finite), got l_a={l_a}, u_a={u_a}")
        if not 0.0 <= l_m <= u_m < math.pi:
            raise ValueError(f"need 0 <= l_m <= u_m < pi (angular margins), got {l_m}, {u_m}")
        if not (lambda_g >= 0 and math.isfinite(lambda_g)):
            raise ValueError(f"lambda_g must be a finite value >= 0, got {lambda_g}")
        super().__init__(scale, 1.0, l_m, 0.0)
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)

    def batch_target(self, cos, classes, batch):
        norms = batch.norms.to(cos.dtype)
        a = norms.clamp(self.l_a, self.u_a)
        inside = (norms > self.l_a) & (norms < self.u_a)
        gain = (self.u_m - self.l_m) / (self.u_a - self.l_a)
        phi, dphi_dc, dphi_dm = _arc(cos, self.l_m + gain * (a - self.l_a))
        # a tensor in cos's dtype: torch.where of two Python numbers would take the
        # default dtype (float32) and round a float64 head's gradient
        dm_dnorm = inside.to(cos.dtype) * gain
        reg, count = _valid_mean(a / self.u_a**2 + 1.0 / a, batch.valid)
        dreg = torch.where(
            batch.valid & inside, (1.0 / self.u_a**2 - 1.0 / a**2) / count.clamp(min=1), 0.0
        )
        return TargetTerms(
            self.scale * phi,
            self.scale * dphi_dc,
            norm_slope=self.scale * dphi_dm * dm_dnorm,
            extra_loss=self.lambda_g * reg,
            extra_norm_grad=self.lambda_g * dreg,
        )


class CurricularFace(BatchMargin):
    """CurricularFace: ArcFace's target, hard negatives re-weighted by a curriculum."""

    primary = "m2"
    needs_global_cos = True

    def __init__(self, scale: float = 64.0, margin: float = 0.5, t_alpha: float = 0.01) -> None:
        super().__init__(scale, 1.0, margin, 0.0)
        if not 0.0 < t_alpha <= 1.0:
            raise ValueError(f"t_alpha is an EMA weight in (0, 1], got {t_alpha}")
        self.t_alpha = float(t_alpha)
        self.register_buffer("t", torch.tensor(0.0, dtype=torch.float64))

    def batch_target(self, cos, classes, batch):
        m = self._scalar("m2", cos.dtype)
        global_cos = batch.global_cos.to(cos.dtype)
        if batch.training:
            mean, count = _valid_mean(global_cos.clamp(-1.0, 1.0), batch.valid)
            _ema_(self.t, mean.to(self.t.dtype), self.t_alpha, count > 0)
        phi, dphi_dc, _ = _arc(cos, m)
        c = global_cos.clamp(-1.0, 1.0)
        plain = c * torch.cos(m) - torch.sqrt((1.0 - c * c).clamp(min=0.0)) * torch.sin(m)
        threshold = torch.where(batch.valid, plain, float("inf"))
        return TargetTerms(
            self.scale * phi,
            self.scale * dphi_dc,
            hard_threshold=threshold,
            hard_t=self.t.to(cos.dtype),
        )


class ElasticFace(BatchMargin):
    """ElasticFace: per-sample margins drawn from a normal distribution."""

    needs_global_cos = True

    def __init__(
        self,
        scale: float = 64.0,
        margin: float = 0.5,
        std: float = 0.0125,
        kind: Literal["arc", "cos"] = "arc",
        plus: bool = False,
    ) -> None:
        if kind not in ("arc", "cos"):
            raise ValueError(f"kind must be 'arc' or 'cos', got {kind!r}")
        arc, cosine = (margin, 0.0) if kind == "arc" else (0.0, margin)
        super().__init__(scale, 1.0, arc, cosine)
        if not (std >= 0 and math.isfinite(std)):
            raise ValueError(f"std must be a finite value >= 0, got {std}")
        self.kind, self.std, self.plus = kind, float(std), bool(plus)
        self.primary = "m2" if kind == "arc" else "m3"
        self.last_margins: torch.Tensor | None = None

    def batch_target(self, cos, classes, batch):
        mean = self._scalar(self.primary, cos.dtype)
        margins = mean.expand_as(cos)
        if batch.training:
            generator = sampling_generator(batch.seed, batch.step, 0, cos.device, _ELASTIC_STREAM)
            margins = mean + self.std * torch.randn(
                cos.shape, generator=generator, device=cos.device, dtype=cos.dtype
            )
            if self.plus:
                # The largest target cosine gets the smallest margin (over the batch).
                order = torch.argsort(batch.global_cos.to(cos.dtype), descending=True)
                margins = margins.new_empty(margins.shape).scatter_(
                    0, order, torch.sort(margins).values
                )
            self.last_margins = margins
        if self.kind == "cos":
            return TargetTerms(self.scale * (cos - margins), torch.full_like(cos, self.scale))
        phi, dphi_dc, _ = _arc(cos, margins)
        return TargetTerms(self.scale * phi, self.scale * dphi_dc)
