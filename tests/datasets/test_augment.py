"""The batched AdaFace augmentations (``datasets/augment.py``) against per-image references.

Every stage is checked at probability 1 against a reference computed image by image in a
Python loop: slicing for the crop and the erasing, ``cv2.resize`` (float32) for the
low-resolution stage, torchvision's ColorJitter tensor formulas for the photometric one.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from datasets.augment import (
    BRIGHTNESS,
    CONTRAST,
    INTERPOLATIONS,
    SATURATION,
    BatchAugment,
    augment_generator,
    lowres_matrix,
)
from partial_fc.sampling import sampling_generator
from tests.dispatch_count import DispatchCounter

pytestmark = pytest.mark.on_device

SIZE = 112


def _images(batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Float32 ``(B, 3, 112, 112)`` in [-1, 1], as ``normalize_batch`` delivers: smooth
    colour gradients plus noise, so every stage changes them visibly."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, 1, 1, generator=g) * 2 - 1
    ramp = torch.linspace(-0.5, 0.5, SIZE).view(1, 1, 1, SIZE)
    noise = (torch.rand(batch, 3, SIZE, SIZE, generator=g) - 0.5) * 0.6
    return (
        (base * 0.6 + ramp * torch.rand(batch, 3, 1, 1, generator=g) + noise)
        .clamp(-1, 1)
        .to(device)
    )


def _params(aug: BatchAugment, images: torch.Tensor, seed: int, step: int, rank: int):
    gen = augment_generator(seed, step, rank, 0, images.device)
    return aug.draw(images.shape[0], images.shape[2], images.shape[3], gen)


# ------------------------------------------------------------------ identity, determinism
def test_probability_zero_is_bit_exact_identity(device: torch.device) -> None:
    images = _images(8, device)
    for aug in (BatchAugment(), BatchAugment(0.0, 0.0, 0.0, 0.0, erase_fill="constant")):
        assert not aug.enabled
        out = aug(images, step=3, rank=1, seed=5)
        assert torch.equal(out, images)


def test_unselected_samples_pass_through_bit_exact(device: torch.device) -> None:
    images = _images(64, device)
    aug = BatchAugment(0.3, 0.3, 0.3, 0.3)
    out = aug(images, step=0, rank=0, seed=0)
    p = _params(aug, images, 0, 0, 0)
    touched = p.crop_apply | p.lowres_apply | p.photo_apply | p.erase_apply
    changed = (out != images).flatten(1).any(dim=1)
    assert torch.equal(changed, touched)  # untouched are bit-exact, touched all changed
    assert 0 < int(touched.sum()) < 64


def test_same_key_same_output_other_key_other_output(device: torch.device) -> None:
    images = _images(16, device)
    aug = BatchAugment(0.5, 0.5, 0.5, 0.5)
    first = aug(images, step=7, rank=1, seed=3)
    assert torch.equal(first, aug(images, step=7, rank=1, seed=3))
    assert torch.equal(first, BatchAugment(0.5, 0.5, 0.5, 0.5)(images, 7, 1, 3))  # no state
    for other in ((8, 1, 3, 0), (7, 0, 3, 0), (7, 1, 4, 0), (7, 1, 3, 1)):
        step, rank, seed, micro = other
        assert not torch.equal(first, aug(images, step, rank, seed, micro)), other


def test_stream_differs_from_partial_fc_sampling_stream() -> None:
    a = torch.rand(8, generator=augment_generator(0, 5, 0, 0, "cpu"))
    b = torch.rand(8, generator=sampling_generator(0, 5, 0, torch.device("cpu")))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match=">= 0"):
        augment_generator(-1, 0, 0, 0, "cpu")


def test_one_probability_does_not_move_other_stages_draws(device: torch.device) -> None:
    images = _images(32, device)
    a = _params(BatchAugment(0.2, 0.2, 0.2, 0.0), images, 1, 2, 0)
    b = _params(BatchAugment(0.9, 0.5, 0.0, 1.0), images, 1, 2, 0)
    for name in ("crop_box", "lowres_side", "lowres_down", "lowres_up", "photo_factors"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.photo_order, b.photo_order) and torch.equal(a.erase_box, b.erase_box)


def test_shape_dtype_device_preserved(device: torch.device) -> None:
    aug = BatchAugment(1.0, 1.0, 1.0, 1.0)
    for dtype in (torch.float32, torch.float64):
        images = _images(4, device).to(dtype)
        out = aug(images, step=0, rank=0, seed=0)
        assert out.shape == images.shape and out.dtype == dtype and out.device == images.device
        assert out.is_contiguous()
        assert out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        aug(torch.zeros(2, 1, SIZE, SIZE, device=device), 0, 0, 0)


def test_no_host_sync(device: torch.device) -> None:
    images = _images(8, device)
    aug = BatchAugment(0.5, 0.5, 0.5, 0.5)
    aug(images, 0, 0, 0)  # first-call setup outside the count
    with DispatchCounter() as counter:
        aug(images, 1, 0, 0)
    assert counter.total > 50  # the counter saw the stage
    assert counter.host_syncs == [], counter.host_syncs


def test_bad_settings_raise() -> None:
    for kwargs in (
        {"crop_prob": 1.5},
        {"erase_prob": -0.1},
        {"lowres_side": (0.1, 1.0)},
        {"crop_scale": (0.5, 0.4)},
        {"brightness": 1.5},
        {"erase_fill": "zeros"},
    ):
        with pytest.raises(ValueError):
            BatchAugment(**kwargs)


def test_from_config_reads_every_field(device: torch.device) -> None:
    from types import SimpleNamespace

    fields = {
        "crop_prob": 0.1, "crop_min_scale": 0.3, "lowres_prob": 0.2, "lowres_min_side": 0.5,
        "photometric_prob": 0.3, "brightness": 0.1, "contrast": 0.2, "saturation": 0.3,
        "erase_prob": 0.4, "erase_fill": "constant", "erase_value": -0.5,
    }  # fmt: skip
    aug = BatchAugment.from_config(SimpleNamespace(**fields))
    assert (aug.crop_prob, aug.lowres_prob, aug.photometric_prob, aug.erase_prob) == (
        0.1, 0.2, 0.3, 0.4
    )  # fmt: skip
    assert aug.crop_scale == (0.3, 1.0) and aug.lowres_side == (0.5, 1.0)
    assert aug.jitter == (0.1, 0.2, 0.3) and (aug.erase_fill, aug.erase_value) == ("constant", -0.5)
    p = aug.draw(2048, SIZE, SIZE, augment_generator(0, 0, 0, 0, device))
    low = torch.tensor([0.9, 0.8, 0.7], device=device)
    assert bool((p.photo_factors >= low).all() & (p.photo_factors <= 2 - low).all())
    assert int(p.lowres_side.min()) >= SIZE // 2


# ------------------------------------------------------------------ probabilities
def test_fraction_of_augmented_samples_matches_probability(device: torch.device) -> None:
    batch = 4096
    probs = (0.2, 0.35, 0.5, 0.65)
    aug = BatchAugment(*probs)
    p = aug.draw(batch, SIZE, SIZE, augment_generator(0, 0, 0, 0, device))
    # erase_apply also needs a rectangle found in 10 attempts: almost always (checked below)
    drawn = (p.crop_apply, p.lowres_apply, p.photo_apply, p.erase_apply)
    for prob, apply in zip(probs, drawn, strict=True):
        sigma = math.sqrt(batch * prob * (1 - prob))
        assert abs(int(apply.sum()) - batch * prob) < 5 * sigma, (prob, int(apply.sum()))
    # and on the images: the photometric stage alone changes exactly the samples it drew
    images = _images(batch, device)
    photo = BatchAugment(photometric_prob=0.35)
    out = photo(images, 0, 0, 0)
    changed = (out != images).flatten(1).any(dim=1)
    assert torch.equal(changed, _params(photo, images, 0, 0, 0).photo_apply)


# ------------------------------------------------------------------ crop
def test_crop_against_per_image_slicing(device: torch.device) -> None:
    images = _images(64, device)
    aug = BatchAugment(crop_prob=1.0)
    out = aug(images, step=2, rank=0, seed=0).cpu()
    p = _params(aug, images, 0, 2, 0)
    assert bool(p.crop_apply.all())
    src = images.cpu()
    for b, (top, left, h, w) in enumerate(p.crop_box.tolist()):
        assert 0 <= top and top + h <= SIZE and 0 <= left and left + w <= SIZE
        # torchvision's search: area within scale, aspect within ratio, up to rounding
        assert 0.2 * SIZE * SIZE - 2 * SIZE <= h * w
        assert 0.75 * (h - 1) <= w + 1 and w - 1 <= 4 / 3 * (h + 1)
        ref = torch.full_like(src[b], -1.0)  # AdaFace pastes the crop on a black image
        ref[:, top : top + h, left : left + w] = src[b, :, top : top + h, left : left + w]
        assert torch.equal(out[b], ref), b


def test_crop_fallback_is_the_full_image(device: torch.device) -> None:
    # w = sqrt(area * 2) > 112 in every attempt: torchvision falls back to the whole image
    aug = BatchAugment(crop_prob=1.0, crop_scale=(1.0, 1.0), crop_ratio=(2.0, 2.5))
    images = _images(8, device)
    assert torch.equal(aug(images, 0, 0, 0), images)


# ------------------------------------------------------------------ low resolution
def _cv2_lowres(img: torch.Tensor, side: int, down: int, up: int) -> torch.Tensor:
    hwc = img.permute(1, 2, 0).numpy().astype(np.float32)
    small = cv2.resize(hwc, (side, side), interpolation=down)
    back = cv2.resize(small, (hwc.shape[1], hwc.shape[0]), interpolation=up)
    return torch.from_numpy(np.clip(back, -1, 1)).permute(2, 0, 1)


def test_lowres_against_cv2_per_image(device: torch.device) -> None:
    images = _images(48, device)
    aug = BatchAugment(lowres_prob=1.0)
    out = aug(images, step=4, rank=1, seed=2).cpu()
    p = _params(aug, images, 2, 4, 1)
    sides = p.lowres_side.tolist()
    assert min(sides) >= int(0.2 * SIZE) and max(sides) < SIZE
    for b, (side, down, up) in enumerate(
        zip(sides, p.lowres_down.tolist(), p.lowres_up.tolist(), strict=True)
    ):
        ref = _cv2_lowres(images[b].cpu(), side, down, up)
        torch.testing.assert_close(out[b], ref, atol=1e-4, rtol=0, msg=f"{b}: {side} {down} {up}")


def test_lowres_matrix_matches_cv2_for_every_interpolation_pair() -> None:
    sides = torch.tensor([22, 23, 28, 37, 55, 56, 57, 83, 99, 111, 112])
    image = _images(1, torch.device("cpu"))[0, 0].double()
    for down in INTERPOLATIONS:
        for up in INTERPOLATIONS:
            n = len(sides)
            mats = lowres_matrix(SIZE, sides, torch.full((n,), down), torch.full((n,), up), SIZE)
            for b, side in enumerate(sides.tolist()):
                small = cv2.resize(image.float().numpy(), (side, side), interpolation=down)
                ref = cv2.resize(small, (SIZE, SIZE), interpolation=up)
                m = mats[b].double()
                got = m @ image @ m.T
                err = (got - torch.from_numpy(ref).double()).abs().max().item()
                assert err < 1e-4, (down, up, side, err)


def test_lowres_draws_cover_every_interpolation(device: torch.device) -> None:
    p = BatchAugment(lowres_prob=1.0).draw(1024, SIZE, SIZE, augment_generator(0, 0, 0, 0, device))
    assert set(p.lowres_down.tolist()) == set(INTERPOLATIONS)
    assert set(p.lowres_up.tolist()) == set(INTERPOLATIONS)
    sides = p.lowres_side.float()
    assert sides.min() >= 22 and sides.max() <= 111 and abs(sides.mean() - 66.6) < 2


# ------------------------------------------------------------------ photometric
def _jitter_reference(img: torch.Tensor, factors: list[float], order: list[int]) -> torch.Tensor:
    """torchvision's adjust_brightness/contrast/saturation (tensor path) on one image."""
    p = (img.double() + 1) / 2
    weights = torch.tensor([0.2989, 0.587, 0.114], dtype=torch.float64).view(3, 1, 1)
    for op in order:
        f = factors[op]
        gray = (p * weights).sum(0, keepdim=True)
        if op == BRIGHTNESS:
            ref = torch.zeros_like(p)
        elif op == CONTRAST:
            ref = gray.mean()
        else:
            assert op == SATURATION
            ref = gray
        p = (f * p + (1 - f) * ref).clamp(0, 1)
    return (p * 2 - 1).float()


def test_photometric_against_per_image_formulas(device: torch.device) -> None:
    images = _images(48, device)
    aug = BatchAugment(photometric_prob=1.0)
    out = aug(images, step=9, rank=0, seed=1).cpu()
    p = _params(aug, images, 1, 9, 0)
    factors, orders = p.photo_factors.tolist(), p.photo_order.tolist()
    assert {tuple(o) for o in orders} == {
        (0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)
    }  # fmt: skip
    assert 0.5 <= min(min(f) for f in factors) and max(max(f) for f in factors) <= 1.5
    for b in range(len(images)):
        ref = _jitter_reference(images[b].cpu(), factors[b], orders[b])
        torch.testing.assert_close(out[b], ref, atol=2e-5, rtol=0, msg=str(b))


# ------------------------------------------------------------------ erasing
def test_erase_noise_against_per_image_slicing(device: torch.device) -> None:
    images = _images(64, device)
    aug = BatchAugment(erase_prob=1.0)
    out = aug(images, step=1, rank=3, seed=0).cpu()
    p = _params(aug, images, 0, 1, 3)
    assert p.erase_noise is not None
    noise, src = p.erase_noise.cpu(), images.cpu()
    assert noise.min() >= -1 and noise.max() <= 1
    erased = 0
    for b, (top, left, h, w) in enumerate(p.erase_box.tolist()):
        ref = src[b].clone()
        if bool(p.erase_apply[b]):
            erased += 1
            assert h < SIZE and w < SIZE and 0.02 * SIZE * SIZE - 2 * SIZE <= h * w
            assert h * w <= 0.33 * SIZE * SIZE + 2 * SIZE
            ref[:, top : top + h, left : left + w] = noise[b, :, top : top + h, left : left + w]
        assert torch.equal(out[b], ref), b
    assert erased >= 60  # a rectangle is found in 10 attempts nearly always


def test_erase_constant_and_fallback(device: torch.device) -> None:
    images = _images(16, device)
    aug = BatchAugment(erase_prob=1.0, erase_fill="constant", erase_value=0.25)
    out = aug(images, 0, 0, 0).cpu()
    p = _params(aug, images, 0, 0, 0)
    for b, (top, left, h, w) in enumerate(p.erase_box.tolist()):
        ref = images[b].cpu().clone()
        ref[:, top : top + h, left : left + w] = 0.25
        assert torch.equal(out[b], ref), b
    # h = sqrt(area * 3) > 112 in every attempt: torchvision erases nothing
    never = BatchAugment(erase_prob=1.0, erase_scale=(0.9, 1.0), erase_ratio=(3.0, 3.3))
    assert torch.equal(never(images, 0, 0, 0), images)


def test_stages_compose_in_adaface_order(device: torch.device) -> None:
    """crop → low resolution → photometric → erasing, each as checked above."""
    from datasets.augment import apply_crop, apply_erase, apply_lowres, apply_photometric

    images = _images(16, device)
    aug = BatchAugment(0.5, 0.5, 0.5, 0.5)
    p = _params(aug, images, 4, 4, 0)
    x = apply_crop(images, p.crop_apply, p.crop_box)
    x = apply_lowres(x, p.lowres_apply, p.lowres_side, p.lowres_down, p.lowres_up)
    x = apply_photometric(x, p.photo_apply, p.photo_factors, p.photo_order)
    x = apply_erase(x, p.erase_apply, p.erase_box, p.erase_noise)
    assert torch.equal(aug(images, 4, 0, 4), x)
