"""The embedded synthetic face dataset: procedural face-like identities, no download.

Each identity has fixed traits (face and jaw shape, skin tone and a skin texture pattern,
moles, hair colour and style, eye spacing/size/iris colour, eyebrows, nose, mouth, ears,
optional beard and glasses). Each image adds nuisance variation: in-plane rotation, yaw-like
feature shift, scale, shift, background and clutter, expression (eye openness, smile, open
mouth, eyebrow raise), illumination gain/gradient/colour cast, blur, sensor noise and JPEG
quality. Everything derives from ``(seed, split, identity, image)``, so the output is
bit-identical for any number of worker processes.

Command::

    python -m datasets.synthetic OUT_DIR [--identities 400] [--images-per-identity 30]
        [--heldout-identities 200] [--pairs-per-fold 200] [--seed 0] [--workers N]

writes ``OUT_DIR/train.rec``, ``train.idx`` (face layout: N images, C classes), ``property``
(``C,112,112``), ``heldout.bin`` (LFW format: pickle of ``(list of JPEG bytes, list of
bool)``, 10 folds of ``pairs_per_fold`` pairs, half same, built from held-out identities
only) and ``meta.json``. Python API: :func:`generate`, :func:`render_face`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import write_bytes
from common.face_input import ARCFACE_INPUT
from datasets.face_layout import FaceRecWriter

SIZE = ARCFACE_INPUT.size
TRAIN, HELDOUT, PAIRS = 0, 1, 2  # rng stream ids


def _cv2():
    import cv2

    return cv2


_NOISE: list[np.ndarray] = []


def _noise_bank() -> np.ndarray:
    """A fixed (256, 256, 3) standard-normal field; each image adds a random crop of it."""
    if not _NOISE:
        _NOISE.append(np.random.default_rng(0x5EED).standard_normal((256, 256, 3), np.float32))
    return _NOISE[0]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


@dataclass(frozen=True)
class Identity:
    """Fixed traits of one synthetic identity (colours are BGR 0..255)."""

    face_a: float  # face half-width
    face_b: float  # face half-height
    jaw: float  # chin half-width relative to face_a
    skin: tuple[float, float, float]
    texture: np.ndarray  # (6, 6) low-frequency skin pattern in [-1, 1]
    texture_amp: float
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius) relative to face
    hair_color: tuple[float, float, float]
    hair_style: int  # 0 bald, 1 short, 2 long, 3 fringe
    hairline: float
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    iris: tuple[float, float, float]
    brow_thick: int
    brow_tilt: float
    brow_gap: float
    nose_len: float
    nose_w: float
    mouth_w: float
    mouth_y: float
    lip: tuple[float, float, float]
    ear: float
    beard: int  # 0 none, 1 moustache, 2 full
    glasses: int  # 0 none, 1 round, 2 square


def make_identity(seed: int, split: int, index: int) -> Identity:
    """Draw the traits of identity ``index`` of ``split`` (TRAIN or HELDOUT)."""
    r = _rng(seed, split, index, 1)
    tone = r.uniform(0.0, 1.0)
    skin = np.array([95, 140, 200]) * (0.45 + 0.6 * tone) + r.normal(0, 12, 3)
    hair = r.choice(
        [[30, 30, 35], [20, 45, 90], [40, 90, 160], [140, 150, 160], [25, 25, 110], [60, 70, 80]]
    ) + r.normal(0, 15, 3)
    n_moles = int(r.integers(0, 4))
    moles = tuple(
        (float(r.uniform(-0.6, 0.6)), float(r.uniform(-0.3, 0.7)), float(r.uniform(1.2, 2.6)))
        for _ in range(n_moles)
    )
    return Identity(
        face_a=float(r.uniform(33, 43)),
        face_b=float(r.uniform(43, 53)),
        jaw=float(r.uniform(0.45, 0.9)),
        skin=tuple(np.clip(skin, 20, 250).tolist()),
        texture=r.uniform(-1, 1, (6, 6)).astype(np.float32),
        texture_amp=float(r.uniform(0.04, 0.16)),
        moles=moles,
        hair_color=tuple(np.clip(hair, 0, 255).tolist()),
        hair_style=int(r.integers(0, 4)),
        hairline=float(r.uniform(0.55, 0.85)),
        eye_dx=float(r.uniform(14, 21)),
        eye_y=float(r.uniform(-14, -6)),
        eye_w=float(r.uniform(5.5, 9.0)),
        eye_h=float(r.uniform(2.5, 4.5)),
        iris=tuple(r.choice([[90, 60, 30], [40, 60, 90], [60, 120, 60], [150, 110, 60]]) * 1.0),
        brow_thick=int(r.integers(1, 4)),
        brow_tilt=float(r.uniform(-0.35, 0.35)),
        brow_gap=float(r.uniform(6, 11)),
        nose_len=float(r.uniform(10, 20)),
        nose_w=float(r.uniform(4, 9)),
        mouth_w=float(r.uniform(9, 17)),
        mouth_y=float(r.uniform(20, 30)),
        lip=tuple(np.clip(np.array([90, 80, 170]) + r.normal(0, 20, 3), 0, 255).tolist()),
        ear=float(r.uniform(5, 10)),
        beard=int(r.choice([0, 0, 0, 1, 2])),
        glasses=int(r.choice([0, 0, 0, 1, 2])),
    )


def _pt(x: float, y: float) -> tuple[int, int]:
    # 4 bits of sub-pixel precision for OpenCV drawing calls (shift=4)
    return round(x * 16), round(y * 16)


def _ellipse(img, c, axes, angle, a0, a1, color, thickness=-1) -> None:
    cv2 = _cv2()
    cv2.ellipse(
        img,
        _pt(*c),
        (max(1, round(axes[0] * 16)), max(1, round(axes[1] * 16))),
        angle,
        a0,
        a1,
        color,
        thickness,
        cv2.LINE_AA,
        4,
    )


def render_face(ident: Identity, rng: np.random.Generator, quality: int | None = None) -> bytes:
    """Render one JPEG (112×112, BGR-encoded as OpenCV writes) of ``ident`` with nuisance
    variation drawn from ``rng``."""
    cv2 = _cv2()
    # --- background and clutter
    bg = rng.uniform(30, 225, 3)
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = bg.astype(np.uint8)
    for _ in range(int(rng.integers(0, 4))):
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        c = rng.uniform(0, SIZE, 2)
        _ellipse(img, c, rng.uniform(5, 30, 2), float(rng.uniform(0, 180)), 0, 360, col)

    cx, cy = 56.0, 60.0
    yaw = float(rng.uniform(-1, 1))
    pitch = float(rng.uniform(-1, 1))
    fx, fy = cx + 5.0 * yaw, cy + 3.0 * pitch  # inner-feature centre (yaw/pitch-like shift)
    a, b = ident.face_a * (1 - 0.06 * abs(yaw)), ident.face_b
    skin = ident.skin
    hair = ident.hair_color

    # --- hair behind the head, ears, face
    if ident.hair_style == 2:
        _ellipse(img, (cx, cy + 4), (a + 7, b + 8), 0, 180, 360, hair)
        cv2.rectangle(
            img, _pt(cx - a - 7, cy + 4), _pt(cx + a + 7, cy + b * 0.8), hair, -1, cv2.LINE_AA, 4
        )
    for side in (-1, 1):
        _ellipse(
            img,
            (cx + side * (a - 1) - yaw * 2, cy + 2),
            (ident.ear, ident.ear * 1.6),
            0,
            0,
            360,
            skin,
        )
    _ellipse(img, (cx, cy), (a, b), 0, 0, 360, skin)
    _ellipse(img, (cx, cy + b * 0.45), (a * ident.jaw, b * 0.55), 0, 0, 360, skin)

    # --- skin texture (identity pattern, follows the face)
    x0, x1 = max(0, int(cx - a)), min(SIZE, math.ceil(cx + a))
    y0, y1 = max(0, int(cy - b)), min(SIZE, math.ceil(cy + b))
    tex = cv2.resize(ident.texture, (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC)
    mask = np.zeros((y1 - y0, x1 - x0), np.float32)
    cv2.ellipse(mask, (int(cx - x0), int(cy - y0)), (int(a) - 1, int(b) - 1), 0, 0, 360, 1.0, -1)
    patch = img[y0:y1, x0:x1].astype(np.float32)
    patch *= (1 + ident.texture_amp * tex * mask)[:, :, None]
    img[y0:y1, x0:x1] = np.clip(patch, 0, 255).astype(np.uint8)
    for mx, my, mr in ident.moles:
        _ellipse(
            img,
            (fx + mx * a, fy + my * b * 0.6),
            (mr, mr),
            0,
            0,
            360,
            tuple(0.35 * v for v in skin),
        )

    # --- hair on top
    if ident.hair_style in (1, 2, 3):
        top = cy - b * ident.hairline
        _ellipse(img, (cx, top + 2), (a + 1.5, b * 0.5), 0, 180, 360, hair)
        if ident.hair_style == 3:
            pts = np.array(
                [_pt(cx - a * 0.8, top), _pt(cx + a * 0.7, top), _pt(cx + a * 0.2, top + 12)],
                np.int32,
            )
            cv2.fillConvexPoly(img, pts, hair, cv2.LINE_AA, 4)

    # --- expression
    eye_open = float(np.clip(rng.normal(1.0, 0.25), 0.15, 1.3))
    smile = float(rng.uniform(-0.6, 1.0))
    mouth_open = float(max(0.0, rng.uniform(-0.6, 1.0)))
    brow_raise = float(rng.uniform(-1.5, 2.5))
    gaze = rng.uniform(-1.5, 1.5, 2)

    # --- eyes and brows
    ey = fy + ident.eye_y
    for side in (-1, 1):
        ex = fx + side * ident.eye_dx
        _ellipse(img, (ex, ey), (ident.eye_w, ident.eye_h * eye_open), 0, 0, 360, (235, 235, 235))
        if eye_open > 0.3:
            r_iris = min(ident.eye_h * eye_open, ident.eye_w) * 0.9
            _ellipse(
                img, (ex + gaze[0], ey + gaze[1] * 0.5), (r_iris, r_iris), 0, 0, 360, ident.iris
            )
            _ellipse(
                img,
                (ex + gaze[0], ey + gaze[1] * 0.5),
                (r_iris * 0.45, r_iris * 0.45),
                0,
                0,
                360,
                (15, 15, 15),
            )
        _ellipse(
            img,
            (ex, ey),
            (ident.eye_w, ident.eye_h * eye_open),
            0,
            0,
            360,
            tuple(0.5 * v for v in skin),
            1,
        )
        by = ey - ident.brow_gap - brow_raise
        tilt = ident.brow_tilt * side
        p0 = _pt(ex - ident.eye_w * 1.1, by + tilt * 6)
        p1 = _pt(ex + ident.eye_w * 1.1, by - tilt * 6)
        cv2.line(img, p0, p1, hair, ident.brow_thick + 1, cv2.LINE_AA, 4)

    # --- nose
    nt = fy + ident.eye_y + 4
    nb = nt + ident.nose_len
    shade = tuple(0.7 * v for v in skin)
    cv2.line(img, _pt(fx, nt), _pt(fx + yaw * 2, nb), shade, 1, cv2.LINE_AA, 4)
    cv2.line(img, _pt(fx - ident.nose_w, nb), _pt(fx + ident.nose_w, nb), shade, 2, cv2.LINE_AA, 4)

    # --- beard / moustache
    my = fy + ident.mouth_y
    if ident.beard == 2:
        _ellipse(img, (cx, cy + b * 0.55), (a * ident.jaw + 2, b * 0.45), 0, 0, 180, hair)
    if ident.beard >= 1:
        _ellipse(img, (fx, my - 4), (ident.mouth_w + 2, 3), 0, 180, 360, hair, 3)

    # --- mouth
    if mouth_open > 0.15:
        _ellipse(img, (fx, my), (ident.mouth_w * 0.8, 1 + 5 * mouth_open), 0, 0, 360, (40, 30, 60))
    curve = 2 + 5 * abs(smile)
    _ellipse(
        img,
        (fx, my - (curve if smile > 0 else -curve) * 0.5),
        (ident.mouth_w, curve),
        0,
        0 if smile > 0 else 180,
        180 if smile > 0 else 360,
        ident.lip,
        2,
    )

    # --- glasses
    if ident.glasses:
        frame = (30, 30, 30)
        for side in (-1, 1):
            ex = fx + side * ident.eye_dx
            if ident.glasses == 1:
                _ellipse(img, (ex, ey), (ident.eye_w + 3, ident.eye_w + 1), 0, 0, 360, frame, 1)
            else:
                cv2.rectangle(
                    img,
                    _pt(ex - ident.eye_w - 3, ey - 6),
                    _pt(ex + ident.eye_w + 3, ey + 6),
                    frame,
                    1,
                    cv2.LINE_AA,
                    4,
                )
        cv2.line(
            img,
            _pt(fx - ident.eye_dx + ident.eye_w + 3, ey),
            _pt(fx + ident.eye_dx - ident.eye_w - 3, ey),
            frame,
            1,
            cv2.LINE_AA,
            4,
        )

    # --- geometry: rotation, scale, shift
    angle = float(rng.normal(0, 7))
    scale = float(rng.uniform(0.9, 1.1))
    m = cv2.getRotationMatrix2D((cx, cy), angle, scale)
    m[:, 2] += rng.uniform(-5, 5, 2)
    img = cv2.warpAffine(
        img, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )

    # --- illumination, blur, noise
    f = img.astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    slope = rng.uniform(0, 0.35)
    xs = (np.arange(SIZE, dtype=np.float32) - 56) / 56
    gain = np.add.outer(
        np.float32(np.sin(theta) * slope) * xs, np.float32(np.cos(theta) * slope) * xs
    )
    gain += 1
    gain *= np.float32(rng.uniform(0.65, 1.3))
    cast = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    f *= gain[:, :, None]
    f *= cast
    sigma = float(rng.uniform(0, 1.3))
    if sigma > 0.3:
        f = cv2.GaussianBlur(f, (0, 0), sigma)
    bank = _noise_bank()
    oy, ox = (int(v) for v in rng.integers(0, bank.shape[0] - SIZE, 2))
    f += bank[oy : oy + SIZE, ox : ox + SIZE] * np.float32(rng.uniform(0, 6))
    img = np.clip(f, 0, 255).astype(np.uint8)
    q = int(rng.integers(40, 96)) if quality is None else quality
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a synthetic image")
    return buf.tobytes()


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and seed of a synthetic dataset (the defaults are the demo's)."""

    identities: int = 400
    images_per_identity: int = 30
    heldout_identities: int = 200
    pairs_per_fold: int = 200  # 10 folds; half same-identity pairs, half different
    seed: int = 0


def _render_identity(args: tuple[int, int, int, int]) -> list[bytes]:
    seed, split, index, count = args
    ident = make_identity(seed, split, index)
    return [render_face(ident, _rng(seed, split, index, 2, j)) for j in range(count)]


def _render_pair_images(args: tuple[int, list[tuple[int, int]]]) -> list[bytes]:
    seed, jobs = args
    out = []
    for ident_index, draw in jobs:
        ident = make_identity(seed, HELDOUT, ident_index)
        out.append(render_face(ident, _rng(seed, HELDOUT, ident_index, 3, draw)))
    return out


def heldout_pairs(cfg: SyntheticConfig) -> tuple[list[tuple[int, int]], list[bool]]:
    """Identity pairs of the verification file: ``(list of (id_a, id_b), issame)``.

    10 contiguous folds of ``pairs_per_fold`` pairs, first half same, second half different.
    """
    if cfg.heldout_identities < 2:
        raise ValueError("need at least 2 held-out identities for different-identity pairs")
    r = _rng(cfg.seed, PAIRS)
    pairs: list[tuple[int, int]] = []
    issame: list[bool] = []
    half = cfg.pairs_per_fold // 2
    for _ in range(10):
        for _ in range(half):
            i = int(r.integers(cfg.heldout_identities))
            pairs.append((i, i))
            issame.append(True)
        for _ in range(cfg.pairs_per_fold - half):
            i, j = (int(v) for v in r.choice(cfg.heldout_identities, 2, replace=False))
            pairs.append((i, j))
            issame.append(False)
    return pairs, issame


def _map(fn: Any, items: list, workers: int) -> Iterator:
    if workers <= 1:
        return map(fn, items)
    pool = ProcessPoolExecutor(max_workers=workers)
    return _pool_map(pool, fn, items)


def _pool_map(pool: ProcessPoolExecutor, fn: Any, items: list) -> Iterator:
    with pool:
        yield from pool.map(fn, items, chunksize=max(1, len(items) // (64 * pool._max_workers)))


def generate(
    out_dir: str | os.PathLike,
    cfg: SyntheticConfig | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the synthetic dataset to ``out_dir`` (see the module docstring); returns meta.

    The bytes written depend only on ``cfg``, never on ``workers``.
    """

    cfg = cfg or SyntheticConfig()
    if cfg.identities < 1 or cfg.images_per_identity < 1:
        raise ValueError("need at least one identity and one image per identity")
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.identities, desc="identities", unit="id", file=sys.stderr)
    writer = FaceRecWriter(out)
    try:
        jobs = [(cfg.seed, TRAIN, i, cfg.images_per_identity) for i in range(cfg.identities)]
        for label, images in enumerate(_map(_render_identity, jobs, workers)):
            for jpeg in images:
                writer.add(label, jpeg)
            if bar is not None:
                bar.update(1)
        n_images, n_classes = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()

    pairs, issame = heldout_pairs(cfg)
    flat = [(ident, 2 * p + s) for p, pair in enumerate(pairs) for s, ident in enumerate(pair)]
    chunk = 64
    pjobs = [(cfg.seed, flat[i : i + chunk]) for i in range(0, len(flat), chunk)]
    bins = [jpeg for part in _map(_render_pair_images, pjobs, workers) for jpeg in part]
    write_bytes(out / "heldout.bin", pickle.dumps((bins, issame), protocol=4))

    meta = {
        "config": asdict(cfg),
        "num_images": n_images,
        "num_classes": n_classes,
        "heldout_pairs": len(issame),
        "files": ["train.rec", "train.idx", "property", "heldout.bin"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_bytes(out / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m datasets.synthetic", description=__doc__.split("\n\n")[0]
    )
    d = SyntheticConfig()
    p.add_argument("out_dir")
    p.add_argument("--identities", type=int, default=d.identities)
    p.add_argument("--images-per-identity", type=int, default=d.images_per_identity)
    p.add_argument("--heldout-identities", type=int, default=d.heldout_identities)
    p.add_argument("--pairs-per-fold", type=int, default=d.pairs_per_fold)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=None, help="processes (default: cpus, max 4)")
    a = p.parse_args(argv)
    cfg = SyntheticConfig(
        a.identities, a.images_per_identity, a.heldout_identities, a.pairs_per_fold, a.seed
    )
    meta = generate(a.out_dir, cfg, a.workers, progress=True)
    print(
        f"wrote {meta['num_images']} images of {meta['num_classes']} identities and "
        f"{meta['heldout_pairs']} held-out pairs to {a.out_dir} in {meta['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    from common.cli import run_main

    sys.exit(run_main(main, prog="datasets.synthetic"))
