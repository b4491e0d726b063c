"""Batched, seeded training augmentations on the device: the ones AdaFace trains with.

The loader delivers RGB float ``(B, 3, H, W)`` batches in ``[-1, 1]`` on the training
device (:func:`datasets.transforms.normalize_batch`); :class:`BatchAugment` transforms such a
batch as a whole, with per-sample parameters drawn as tensors, no Python loop over images and
nothing read back to the host (a GPU stream never stalls on it). The stages, in AdaFace's
order, each with its own probability:

1. **crop** (AdaFace ``crop_augment``): a ``RandomResizedCrop``-style rectangle (scale
   ``(0.2, 1.0)``, aspect ratio ``(3/4, 4/3)``, torchvision's ``get_params`` with its 10
   attempts and full-image fallback) is *kept in place* and everything around it is set to
   black (``-1``). AdaFace's published ``dataset/augmenter.py`` does exactly this — it uses
   ``RandomResizedCrop`` only for its parameters and pastes the crop back at ``[i:i+h,
   j:j+w]`` of a zero image, with no resize ("crop with zero padding") — so we do too.
2. **low resolution** (AdaFace ``low_res_augmentation``): side ratio ``r ~ U(0.2, 1.0)``,
   ``small = int(r * H)``; resize to ``small x small`` with an interpolation drawn from
   OpenCV's nearest, linear, area, cubic and Lanczos-4, then back to ``H x W`` with another,
   independently drawn one. Each such resize is a linear map along each axis; we build the
   per-sample ``(H, H)`` matrix ``M = U @ D`` (down, then up) from OpenCV's own coefficient
   formulas (float path: the same source coordinates, tap positions, border replication and
   area weights) and apply it as ``M_rows @ image @ M_cols^T`` with batched matmuls. This
   reproduces ``cv2.resize`` on float32 images to rounding (the tests compare them image by
   image), where a ``grid_sample`` emulation could offer only nearest/bilinear/bicubic and
   no area filter. The result is clamped to ``[-1, 1]`` as OpenCV saturates uint8.
3. **photometric** (AdaFace ``photometric_augmentation``): ``ColorJitter(brightness=0.5,
   contrast=0.5, saturation=0.5, hue=0)``: factors ``~ U(0.5, 1.5)`` applied in a random
   order per sample, each a blend clamped to the valid range, with torchvision's tensor
   definitions (brightness: blend with black; contrast: with the mean of the grayscale
   image; saturation: with the grayscale image; grayscale = ``0.2989 R + 0.587 G + 0.114
   B``). The blends are affine, so they are done directly in ``[-1, 1]``.
4. **erasing** (not in AdaFace; off by default): torchvision's ``RandomErasing`` rectangle
   (area ``(0.02, 0.33)`` of the image, aspect ``(0.3, 3.3)``, 10 attempts, none erased if
   all fail) filled with uniform noise in ``[-1, 1]`` (an occluder made of valid pixels;
   torchvision's ``value='random'`` draws unclamped N(0, 1)) or with a constant.

Differences from AdaFace's per-image code, all deliberate: we work in float, so nothing is
rounded to uint8 between stages; the photometric stage uses torchvision's tensor formulas
(AdaFace runs the PIL ones, which round to uint8 and use an integer grayscale mean); the
random horizontal flip stays in the loader workers (``datasets.transforms``).

Randomness: every call draws from a fresh ``torch.Generator`` on the images' device, seeded
by a NumPy ``SeedSequence`` of ``(seed, step, rank, micro)`` and a stream tag, so a run
resumed at a step reproduces that step's augmentation with no state in the checkpoint, and
no global RNG is touched. Every parameter of every stage is drawn on every call, whatever
the probabilities, so changing one stage's probability leaves the other stages' draws alone.
A stage with probability 0 is skipped entirely (identity, bit-exact); samples a stage does
not select are passed through bit-exactly by ``torch.where``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

#: Interpolation codes, in OpenCV's numbering (``cv2.INTER_*``), that the low-resolution
#: stage draws from uniformly, as AdaFace's ``np.random.choice`` over these five does.
INTER_NEAREST, INTER_LINEAR, INTER_CUBIC, INTER_AREA, INTER_LANCZOS4 = 0, 1, 2, 3, 4
INTERPOLATIONS = (INTER_NEAREST, INTER_LINEAR, INTER_AREA, INTER_CUBIC, INTER_LANCZOS4)

#: Stage indices of the photometric permutation: ColorJitter's function ids 0, 1, 2.
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2

#: torchvision's ``rgb_to_grayscale`` weights (they sum to 0.9999, not 1).
_GRAY = (0.2989, 0.587, 0.114)

#: Tag mixed into the seed so the augmentation stream never coincides with another stream
#: seeded from the same small integers (Partial-FC sampling seeds ``(seed, step, start)``).
_STREAM_TAG = 0x41554731  # "AUG1"

#: Attempts of torchvision's ``RandomResizedCrop`` / ``RandomErasing`` parameter search.
_ATTEMPTS = 10

#: Taps per output pixel in a resampling matrix: Lanczos-4 needs 8, area at most
#: ``1 + ceil(1 / 0.2) + 1 = 7`` for the smallest side ratio allowed (0.2).
_TAPS = 8


class AugmentSettings(Protocol):
    """What :meth:`BatchAugment.from_config` reads (``configs.schema.AugmentConfig``)."""

    crop_prob: float
    crop_min_scale: float
    lowres_prob: float
    lowres_min_side: float
    photometric_prob: float
    brightness: float
    contrast: float
    saturation: float
    erase_prob: float
    erase_fill: str
    erase_value: float


@dataclass(frozen=True)
class AugmentParams:
    """One call's per-sample parameters (all on the images' device; ``B`` samples).

    Boxes are ``(top, left, height, width)`` in pixels, int64 ``(B, 4)``. Every field is
    drawn whatever the probabilities; the ``*_apply`` masks say which samples a stage changes.
    """

    crop_apply: torch.Tensor
    """``(B,)`` bool: the crop stage changes this sample."""
    crop_box: torch.Tensor
    """``(B, 4)`` int64: the rectangle kept; everything else becomes black (-1)."""
    lowres_apply: torch.Tensor
    """``(B,)`` bool: the low-resolution stage changes this sample."""
    lowres_side: torch.Tensor
    """``(B,)`` int64: side of the small square image, ``int(r * H)``, ``r ~ U(min, 1)``."""
    lowres_down: torch.Tensor
    """``(B,)`` int64: OpenCV interpolation code of the down-sampling resize."""
    lowres_up: torch.Tensor
    """``(B,)`` int64: OpenCV interpolation code of the up-sampling resize."""
    photo_apply: torch.Tensor
    """``(B,)`` bool: the photometric stage changes this sample."""
    photo_factors: torch.Tensor
    """``(B, 3)`` float32: brightness, contrast and saturation factors."""
    photo_order: torch.Tensor
    """``(B, 3)`` int64: a permutation of ``(BRIGHTNESS, CONTRAST, SATURATION)`` per sample."""
    erase_apply: torch.Tensor
    """``(B,)`` bool: the erasing stage changes this sample (drawn and a rectangle found)."""
    erase_box: torch.Tensor
    """``(B, 4)`` int64: the rectangle replaced by the fill."""
    erase_noise: torch.Tensor | None
    """``(B, 3, H, W)`` uniform noise in [-1, 1) for ``erase_fill='noise'`` (drawn only when
    erasing is on), else None."""


def augment_generator(
    seed: int, step: int, rank: int, micro: int, device: torch.device | str
) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, step, rank, micro)`` by a NumPy
    SeedSequence, so neighbouring steps, ranks and micro-batches get unrelated streams.

    Like :func:`partial_fc.sampling.sampling_generator`, with two more keys than that one
    takes (rank and micro-batch both matter here) and a tag that keeps the stream distinct
    from the sampling stream of the same ``(seed, step)``. All keys must be >= 0.
    """
    keys = (seed, step, rank, micro)
    if min(keys) < 0:
        raise ValueError(f"augment_generator: seed, step, rank, micro must be >= 0, got {keys}")
    state = np.random.SeedSequence([*keys, _STREAM_TAG]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def _uniform(
    shape: tuple[int, ...], low: float, high: float, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=device).mul_(high - low).add_(low)


def _randint_below(bound: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Uniform integers in ``[0, bound)`` elementwise (``bound >= 1``, int64), drawn in
    float64 so every bound below 2**52 is exact."""
    u = torch.rand(bound.shape, generator=gen, device=bound.device, dtype=torch.float64)
    return torch.floor(u * bound).long().clamp_(max=bound - 1)


def _search_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    gen: torch.Generator,
    device: torch.device,
    *,
    erasing: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's rectangle search, for all samples and all attempts at once.

    ``erasing=False`` is ``RandomResizedCrop.get_params`` (``w`` from ``area * aspect``,
    accepted when ``0 < w <= W`` and ``0 < h <= H``); ``erasing=True`` is
    ``RandomErasing.get_params`` (``h`` from ``area * aspect``, accepted when ``h < H`` and
    ``w < W``). The first accepted attempt of each sample wins, as in the sequential loop.

    Returns ``(boxes, found)``: int64 ``(B, 4)`` ``(top, left, h, w)`` and bool ``(B,)``;
    where nothing was accepted the box is the caller's fallback (the full image).
    """
    area = float(height * width)
    target = _uniform((batch, _ATTEMPTS), scale[0], scale[1], gen, device) * area
    log_aspect = _uniform((batch, _ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]), gen, device)
    aspect = torch.exp(log_aspect)
    long_side = torch.round(torch.sqrt(target * aspect)).long()  # round half to even, as Python
    short_side = torch.round(torch.sqrt(target / aspect)).long()
    if erasing:
        h, w = long_side, short_side
        ok = (h < height) & (w < width)
    else:
        w, h = long_side, short_side
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = ok.any(dim=1)
    first = torch.argmax(ok.to(torch.uint8), dim=1, keepdim=True)  # first True (or 0)
    h = torch.where(found, h.gather(1, first).squeeze(1), height)
    w = torch.where(found, w.gather(1, first).squeeze(1), width)
    top = _randint_below(height - h + 1, gen)
    left = _randint_below(width - w + 1, gen)
    return torch.stack([top, left, h, w], dim=1), found


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bool ``(B, 1, H, W)``: True inside each sample's ``(top, left, h, w)`` box ``(B, 4)``,
    built by broadcasting row and column comparisons (no indexing, no host sync)."""
    rows = torch.arange(height, device=boxes.device).view(1, 1, height, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, 1, width)
    top, left, h, w = (boxes[:, k].view(-1, 1, 1, 1) for k in range(4))
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


# ----------------------------------------------------------------------------- resizing
def _linear_taps(
    fx: torch.Tensor, sx: torch.Tensor, n_src: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's 2-tap linear coefficients, with its border rule: a source coordinate left
    of pixel 0 or right of the last pixel snaps to that pixel with weight 1."""
    left = sx < 0
    right = sx >= n_src - 1
    fx = torch.where(left | right, 0.0, fx)
    sx = torch.where(left, 0, torch.where(right, n_src - 1, sx))
    idx = torch.stack([sx, sx + 1], dim=-1)
    return idx, torch.stack([1.0 - fx, fx], dim=-1)


def _cubic_taps(fx: torch.Tensor, sx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's ``interpolateCubic`` (A = -0.75) on taps ``sx-1 .. sx+2``."""
    a = -0.75
    x1 = fx + 1
    c0 = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
    c1 = ((a + 2) * fx - (a + 3)) * fx * fx + 1
    c2 = ((a + 2) * (1 - fx) - (a + 3)) * (1 - fx) * (1 - fx) + 1
    c3 = 1.0 - c0 - c1 - c2
    offsets = torch.arange(-1, 3, device=sx.device)
    return sx.unsqueeze(-1) + offsets, torch.stack([c0, c1, c2, c3], dim=-1)


def _lanczos_taps(fx: torch.Tensor, sx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's ``interpolateLanczos4`` on taps ``sx-3 .. sx+4``: ``sinc(t) sinc(t/4)`` by
    its sine/cosine recurrence, normalised to sum 1 (a tap at distance 0 gets 1e30 first)."""
    s45 = 0.70710678118654752440084436210485
    cs = torch.tensor(
        [[1, 0], [-s45, -s45], [0, 1], [s45, -s45], [-1, 0], [s45, s45], [0, -1], [-s45, s45]],
        dtype=fx.dtype,
        device=fx.device,
    )
    y0 = -(fx + 3) * (math.pi * 0.25)
    s0, c0 = torch.sin(y0).unsqueeze(-1), torch.cos(y0).unsqueeze(-1)
    t = fx.unsqueeze(-1) + 3 - torch.arange(8, device=fx.device, dtype=fx.dtype)
    y = -t * (math.pi * 0.25)
    coeffs = (cs[:, 0] * s0 + cs[:, 1] * c0) / (y * y).clamp_min(1e-30)
    coeffs = torch.where(t.abs() >= 1e-6, coeffs, 1e30)
    coeffs = coeffs / coeffs.sum(dim=-1, keepdim=True)
    offsets = torch.arange(-3, 5, device=sx.device)
    return sx.unsqueeze(-1) + offsets, coeffs


def _area_down_taps(
    d: torch.Tensor, scale: torch.Tensor, n_src: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's ``computeResizeAreaTab`` (area down-sampling, ``scale = src/dst >= 1``):
    output pixel ``d`` averages source ``[d*scale, (d+1)*scale)`` with fractional end
    weights, slivers under 1e-3 dropped, divided by the cell width (clipped at the border)."""
    fsx1 = d * scale
    fsx2 = fsx1 + scale
    cell = torch.minimum(scale, n_src - fsx1)
    sx2 = torch.minimum(torch.floor(fsx2), n_src - 1)
    sx1 = torch.minimum(torch.ceil(fsx1), sx2)
    j = torch.arange(_TAPS - 2, device=d.device, dtype=d.dtype)
    full_idx = sx1.unsqueeze(-1) + j  # sx1, sx1 + 1, ... while < sx2
    full_w = torch.where(full_idx < sx2.unsqueeze(-1), 1.0 / cell.unsqueeze(-1), 0.0)
    head_w = torch.where(sx1 - fsx1 > 1e-3, (sx1 - fsx1) / cell, 0.0)
    tail = torch.minimum(torch.minimum(fsx2 - sx2, torch.ones_like(fsx2)), cell)
    tail_w = torch.where(fsx2 - sx2 > 1e-3, tail / cell, 0.0)
    idx = torch.cat([(sx1 - 1).unsqueeze(-1), full_idx, sx2.unsqueeze(-1)], dim=-1)
    weights = torch.cat([head_w.unsqueeze(-1), full_w, tail_w.unsqueeze(-1)], dim=-1)
    return idx.long(), weights


def _pad_taps(idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pad = _TAPS - idx.shape[-1]
    if pad == 0:
        return idx, w
    return (
        torch.cat([idx, idx[..., :1].expand(*idx.shape[:-1], pad)], dim=-1),
        torch.cat([w, w.new_zeros(*w.shape[:-1], pad)], dim=-1),
    )


def resize_taps(
    n_src: torch.Tensor, n_dst: torch.Tensor, kind: torch.Tensor, src_max: int, dst_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample 1-D resampling taps of ``cv2.resize`` (float path) along one axis.

    Args:
        n_src: ``(B,)`` int64 source lengths, ``1 <= n_src <= src_max``.
        n_dst: ``(B,)`` int64 destination lengths, ``1 <= n_dst <= dst_max``.
        kind: ``(B,)`` int64 OpenCV interpolation codes (:data:`INTERPOLATIONS`).
        src_max, dst_max: padded sizes of the result.

    Returns:
        ``(idx, weights)``, int64 and float64 ``(B, dst_max, 8)``: output pixel ``d <
        n_dst[b]`` is ``sum_t weights[b, d, t] * source[idx[b, d, t]]``, every index below
        ``n_src[b]`` (OpenCV replicates the border pixel); the weights of the padding rows
        ``d >= n_dst[b]`` are zero.
    """
    device = n_src.device
    f64 = torch.float64
    src = n_src.to(f64).view(-1, 1)
    dst = n_dst.to(f64).view(-1, 1)
    d = torch.arange(dst_max, device=device, dtype=f64).view(1, -1)
    # OpenCV: inv_scale = dst / src (double), scale = 1 / inv_scale.
    inv_scale = dst / src
    scale = 1.0 / inv_scale

    # nearest: sx = floor(d * scale), clipped to the last pixel
    near_idx = torch.minimum(torch.floor(d * scale), src - 1).long().unsqueeze(-1)
    near = _pad_taps(near_idx, torch.ones_like(near_idx, dtype=f64))

    # linear, cubic, Lanczos: fx = float((d + 0.5) * scale - 0.5), sx = floor(fx)
    fx = ((d + 0.5) * scale - 0.5).to(torch.float32).to(f64)
    sx = torch.floor(fx)
    frac = (fx - sx).to(torch.float32).to(f64)
    sx = sx.long()
    linear = _pad_taps(*_linear_taps(frac, sx, n_src.view(-1, 1)))
    cubic = _pad_taps(*_cubic_taps(frac, sx))
    lanczos = _lanczos_taps(frac, sx)

    # area: true area averaging when down-sampling; OpenCV's "area mode" linear coefficients
    # when up-sampling (sx = floor(d * scale), fx = frac((d + 1) - (sx + 1) * inv_scale)).
    area_down = _area_down_taps(d.expand_as(fx), scale.expand_as(fx), src)
    up_sx = torch.floor(d * scale)
    up_fx = ((d + 1) - (up_sx + 1) * inv_scale).to(torch.float32).to(f64)
    up_fx = torch.where(up_fx <= 0, 0.0, up_fx - torch.floor(up_fx))
    area_up = _pad_taps(*_linear_taps(up_fx, up_sx.long(), n_src.view(-1, 1)))
    down = (scale >= 1).unsqueeze(-1)
    area = (
        torch.where(down, area_down[0], area_up[0]),
        torch.where(down, area_down[1], area_up[1]),
    )

    by_code = {
        INTER_NEAREST: near,
        INTER_LINEAR: linear,
        INTER_CUBIC: cubic,
        INTER_AREA: area,
        INTER_LANCZOS4: lanczos,
    }
    idx = torch.zeros_like(linear[0])
    weights = torch.zeros_like(linear[1])
    select = kind.view(-1, 1, 1)
    for code, (k_idx, k_w) in by_code.items():
        idx = torch.where(select == code, k_idx, idx)
        weights = torch.where(select == code, k_w, weights)
    # Border replication: a tap outside the source reads the nearest edge pixel.
    idx = torch.minimum(idx.clamp_min(0), n_src.view(-1, 1, 1) - 1)
    weights = torch.where(d.unsqueeze(-1) < dst.unsqueeze(-1), weights, 0.0)
    return idx, weights


@functools.lru_cache(maxsize=8)
def _lowres_tables(size: int, mid: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Taps of every down-sampling ``size -> side`` and up-sampling ``side -> size``, for
    every ``side`` in ``1..mid`` and interpolation code, at row ``(side - 1) * 5 + code``:
    ``(down_idx, down_w, up_idx, up_w)`` of shapes ``(5 mid, mid, 8)`` and ``(5 mid, size,
    8)``. Built once per size and device (~0.5 M entries), so a call only gathers its rows
    instead of running the ~300 small operators of :func:`resize_taps`."""
    codes = len(INTERPOLATIONS)
    side = torch.arange(1, mid + 1, device=device).repeat_interleave(codes)
    kind = torch.arange(codes, device=device).repeat(mid)
    full = torch.full_like(side, size)
    down_idx, down_w = resize_taps(full, side, kind, size, mid)
    up_idx, up_w = resize_taps(side, full, kind, mid, size)
    return down_idx, down_w.float(), up_idx, up_w.float()


def lowres_matrix(
    size: int, side: torch.Tensor, down: torch.Tensor, up: torch.Tensor, mid: int
) -> torch.Tensor:
    """``(B, size, size)`` float32: resize a length-``size`` axis to ``side`` with ``down``,
    then back to ``size`` with ``up`` (all ``(B,)`` int64, ``1 <= side <= mid``), as one
    matrix (taps from :func:`_lowres_tables`; float32 is ample for O(1) weights)."""
    down_idx, down_w, up_idx, up_w = _lowres_tables(size, mid, side.device)
    codes = len(INTERPOLATIONS)
    rows_down = (side - 1) * codes + down
    rows_up = (side - 1) * codes + up
    batch = side.shape[0]
    shrink = down_w.new_zeros(batch, mid, size)  # rows >= side stay zero
    shrink.scatter_add_(2, down_idx[rows_down], down_w[rows_down])
    grow = up_w.new_zeros(batch, size, mid)  # reads columns < side only
    grow.scatter_add_(2, up_idx[rows_up], up_w[rows_up])
    return torch.bmm(grow, shrink)


# ----------------------------------------------------------------------------- stages
def apply_crop(images: torch.Tensor, apply: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """AdaFace's crop: keep ``boxes`` ``(B, 4)`` of the ``apply`` ``(B,)`` samples of
    ``images`` ``(B, C, H, W)`` in place, black (-1) around them; others unchanged."""
    keep = box_mask(boxes, images.shape[2], images.shape[3]) | ~apply.view(-1, 1, 1, 1)
    return torch.where(keep, images, -1.0)


def apply_lowres(
    images: torch.Tensor,
    apply: torch.Tensor,
    side: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
) -> torch.Tensor:
    """Down-sample every sample of ``images`` ``(B, C, H, W)`` to ``side x side`` and back
    (interpolation codes ``down``/``up``), clamped to [-1, 1]; unchanged where not ``apply``.

    ``M_rows @ image @ M_cols^T`` per channel, whatever the mix of sides and
    interpolations, as two ``bmm`` over the batch; the side applies to both axes, as in
    AdaFace (``(small, small)``).
    """
    batch, channels, height, width = images.shape
    mid = max(height, width)  # the small image is side x side with side <= height
    rows = lowres_matrix(height, side, down, up, mid).to(images.dtype)
    cols = rows if width == height else lowres_matrix(width, side, down, up, mid)
    cols = cols.to(images.dtype)
    # columns: (B, C*H, W) @ (B, W, W), no copy of the images
    out = torch.bmm(images.reshape(batch, channels * height, width), cols.transpose(1, 2))
    # rows, on the transposed channels: (A^T M_rows^T)^T = M_rows A (one transposing copy,
    # where a broadcast matmul would copy both the images and M_rows expanded per channel)
    out = out.view(batch, channels, height, width).transpose(2, 3)
    out = torch.bmm(out.reshape(batch, channels * width, height), rows.transpose(1, 2))
    out = out.view(batch, channels, width, height).transpose(2, 3).clamp_(-1.0, 1.0)
    # ``out=`` keeps the result in the images' contiguous layout (no second transposing copy)
    result = torch.empty_like(images, memory_format=torch.contiguous_format)
    return torch.where(apply.view(-1, 1, 1, 1), out, images, out=result)


def _gray(images: torch.Tensor) -> torch.Tensor:
    """torchvision's grayscale of ``(B, 3, H, W)`` images in [-1, 1], in [-1, 1] units:
    with ``p = (x + 1) / 2``, ``2 (w . p) - 1 = w . x + (sum(w) - 1)``. ``(B, 1, H, W)``."""
    r, g, b = images.unsqueeze(2).unbind(1)  # three (B, 1, H, W) views
    # (a 1x1 convolution does the same in one call, but is 50x slower on one CPU thread)
    return (r * _GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).add_(sum(_GRAY) - 1.0)


def apply_photometric(
    images: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor
) -> torch.Tensor:
    """ColorJitter(brightness, contrast, saturation, hue=0) per sample, batched.

    ``images`` ``(B, 3, H, W)`` in [-1, 1]; ``factors`` ``(B, 3)`` (brightness, contrast,
    saturation); ``order`` ``(B, 3)`` the permutation each sample applies them in. Each step
    is ``clamp(f * x + (1 - f) * ref)`` with ``ref`` black (-1), the grayscale mean, or the
    grayscale image, chosen per sample; three passes (one per position in the order) cover
    every order. ``ref = is_sat * gray + c`` with a per-sample constant ``c`` (-1, the
    mean, or 0), so each pass is the grayscale, one ``addcmul``, one ``lerp`` and a clamp.
    """
    out = images
    view = (-1, 1, 1, 1)
    for position in range(3):
        op = order[:, position].view(view)
        f = factors.gather(1, order[:, position : position + 1]).to(images.dtype).view(view)
        gray = _gray(out)
        mean = gray.mean(dim=(2, 3), keepdim=True)
        constant = torch.where(op == BRIGHTNESS, -1.0, torch.where(op == CONTRAST, mean, 0.0))
        ref = torch.addcmul(constant, gray, (op == SATURATION).to(images.dtype))
        out = torch.lerp(ref, out, f).clamp_(-1.0, 1.0)  # ref + f * (out - ref)
    return torch.where(apply.view(view), out, images)


def apply_erase(
    images: torch.Tensor, apply: torch.Tensor, boxes: torch.Tensor, fill: torch.Tensor | float
) -> torch.Tensor:
    """Replace ``boxes`` ``(B, 4)`` of the ``apply`` samples by ``fill`` (a scalar or a
    tensor broadcastable to ``images`` ``(B, C, H, W)``); others unchanged."""
    inside = box_mask(boxes, images.shape[2], images.shape[3]) & apply.view(-1, 1, 1, 1)
    return torch.where(inside, fill, images)


# ----------------------------------------------------------------------------- the stage
class BatchAugment:
    """AdaFace's training augmentations over a whole batch on its device (module docstring).

    Args:
        crop_prob: probability of the zero-padded crop (AdaFace: 0.2).
        lowres_prob: probability of the down/up-sampling (AdaFace: 0.2).
        photometric_prob: probability of the colour jitter (AdaFace: 0.2).
        erase_prob: probability of random erasing (not used by AdaFace: 0).
        crop_scale: range of the kept area as a fraction of the image (AdaFace: 0.2-1.0).
        crop_ratio: range of the kept rectangle's aspect ratio w/h (AdaFace: 3/4-4/3).
        lowres_side: range of the small side as a fraction of H (AdaFace: 0.2-1.0; the low
            end may not go below 0.2, which bounds the area filter's taps).
        brightness, contrast, saturation: ColorJitter strengths: factors ``~ U(1-s, 1+s)``
            (AdaFace: 0.5 each).
        erase_scale, erase_ratio: RandomErasing's area fraction and aspect (h/w) ranges.
        erase_fill: ``noise`` (uniform in [-1, 1]) or ``constant`` (``erase_value``).
        erase_value: the constant fill, in [-1, 1] units (0 = mid grey).
    """

    def __init__(
        self,
        crop_prob: float = 0.0,
        lowres_prob: float = 0.0,
        photometric_prob: float = 0.0,
        erase_prob: float = 0.0,
        *,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        lowres_side: tuple[float, float] = (0.2, 1.0),
        brightness: float = 0.5,
        contrast: float = 0.5,
        saturation: float = 0.5,
        erase_scale: tuple[float, float] = (0.02, 0.33),
        erase_ratio: tuple[float, float] = (0.3, 3.3),
        erase_fill: Literal["noise", "constant"] = "noise",
        erase_value: float = 0.0,
    ) -> None:
        for name, p in (
            ("crop_prob", crop_prob),
            ("lowres_prob", lowres_prob),
            ("photometric_prob", photometric_prob),
            ("erase_prob", erase_prob),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        ranges = (
            ("crop_scale", crop_scale, 0.0, 1.0),
            ("crop_ratio", crop_ratio, 0.0, math.inf),
            ("lowres_side", lowres_side, 0.2, 1.0),
            ("erase_scale", erase_scale, 0.0, 1.0),
            ("erase_ratio", erase_ratio, 0.0, math.inf),
        )
        for name, (lo, hi), floor, ceiling in ranges:
            # a ratio of 0 has no logarithm; a side ratio below 0.2 needs more area taps
            if not (floor < lo or (floor == 0.2 and lo == floor)) or not lo <= hi <= ceiling:
                raise ValueError(
                    f"{name} must satisfy {floor} < low <= high <= {ceiling}, got {(lo, hi)}"
                )
        for name, s in (
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
        ):
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1] (factors in [1-s, 1+s]), got {s}")
        if erase_fill not in ("noise", "constant"):
            raise ValueError(f"erase_fill must be noise or constant, got {erase_fill!r}")
        if not -1.0 <= erase_value <= 1.0:
            raise ValueError(f"erase_value must lie in [-1, 1], got {erase_value}")
        self.crop_prob = float(crop_prob)
        self.lowres_prob = float(lowres_prob)
        self.photometric_prob = float(photometric_prob)
        self.erase_prob = float(erase_prob)
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.lowres_side = lowres_side
        self.jitter = (brightness, contrast, saturation)
        self.erase_scale = erase_scale
        self.erase_ratio = erase_ratio
        self.erase_fill = erase_fill
        self.erase_value = float(erase_value)

    @classmethod
    def from_config(cls, cfg: AugmentSettings) -> BatchAugment:
        """Build from the ``augment`` section of the training configuration."""
        return cls(
            cfg.crop_prob,
            cfg.lowres_prob,
            cfg.photometric_prob,
            cfg.erase_prob,
            crop_scale=(cfg.crop_min_scale, 1.0),
            lowres_side=(cfg.lowres_min_side, 1.0),
            brightness=cfg.brightness,
            contrast=cfg.contrast,
            saturation=cfg.saturation,
            erase_fill=cfg.erase_fill,  # type: ignore[arg-type]
            erase_value=cfg.erase_value,
        )

    @property
    def enabled(self) -> bool:
        """False when every probability is 0: the call is then the identity."""
        return max(self.crop_prob, self.lowres_prob, self.photometric_prob, self.erase_prob) > 0

    def draw(
        self, batch: int, height: int, width: int, generator: torch.Generator
    ) -> AugmentParams:
        """Every stage's parameters for ``batch`` images of ``height x width``, on the
        generator's device, in a fixed order (stage by stage, decisions first)."""
        device = generator.device
        decide = torch.rand((batch, 4), generator=generator, device=device)
        crop_box, _ = _search_boxes(
            batch, height, width, self.crop_scale, self.crop_ratio, generator, device, erasing=False
        )
        ratio = _uniform((batch,), *self.lowres_side, generator, device).to(torch.float64)
        side = torch.floor(ratio * height).long().clamp_(1, height)  # AdaFace: int(r * H)
        codes = torch.tensor(INTERPOLATIONS, device=device)
        picks = torch.randint(len(INTERPOLATIONS), (2, batch), generator=generator, device=device)
        strength = torch.tensor(self.jitter, device=device)  # ColorJitter: U(1 - s, 1 + s)
        factors = torch.rand((batch, 3), generator=generator, device=device)
        factors = (1.0 - strength) + factors * (2.0 * strength)
        order = torch.argsort(torch.rand((batch, 3), generator=generator, device=device), dim=1)
        erase_box, erase_found = _search_boxes(
            batch,
            height,
            width,
            self.erase_scale,
            self.erase_ratio,
            generator,
            device,
            erasing=True,
        )
        noise = None
        if self.erase_prob > 0 and self.erase_fill == "noise":
            noise = _uniform((batch, 3, height, width), -1.0, 1.0, generator, device)
        probs = torch.tensor(
            [self.crop_prob, self.lowres_prob, self.photometric_prob, self.erase_prob],
            device=device,
        )
        apply = decide < probs
        return AugmentParams(
            crop_apply=apply[:, 0],
            crop_box=crop_box,
            lowres_apply=apply[:, 1],
            lowres_side=side,
            lowres_down=codes[picks[0]],
            lowres_up=codes[picks[1]],
            photo_apply=apply[:, 2],
            photo_factors=factors,
            photo_order=order,
            erase_apply=apply[:, 3] & erase_found,
            erase_box=erase_box,
            erase_noise=noise,
        )

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Run the enabled stages with ``params`` on ``images`` ``(B, 3, H, W)`` in [-1, 1].

        A stage whose probability is 0 is not run at all, so the output is then bit-exact.
        Returns a new tensor of the same shape, dtype and device.
        """
        out = images
        with torch.no_grad():
            if self.crop_prob > 0:
                out = apply_crop(out, params.crop_apply, params.crop_box)
            if self.lowres_prob > 0:
                out = apply_lowres(
                    out,
                    params.lowres_apply,
                    params.lowres_side,
                    params.lowres_down,
                    params.lowres_up,
                )
            if self.photometric_prob > 0:
                out = apply_photometric(
                    out, params.photo_apply, params.photo_factors, params.photo_order
                )
            if self.erase_prob > 0:
                fill = params.erase_noise if params.erase_noise is not None else self.erase_value
                out = apply_erase(out, params.erase_apply, params.erase_box, fill)
        return out

    def __call__(
        self, images: torch.Tensor, step: int, rank: int, seed: int, micro: int = 0
    ) -> torch.Tensor:
        """Augment a batch: float ``(B, 3, H, W)`` in [-1, 1] → same shape, dtype, device.

        The randomness depends only on ``(seed, step, rank, micro)`` (micro: the index of the
        micro-batch within a gradient-accumulation step), so a resumed run at the same step
        and rank reproduces it. Dispatches nothing that waits for the device.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"BatchAugment expects float (B, 3, H, W) images, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if not self.enabled:
            return images
        generator = augment_generator(seed, step, rank, micro, images.device)
        batch, _, height, width = images.shape
        return self.apply(images, self.draw(batch, height, width, generator))
