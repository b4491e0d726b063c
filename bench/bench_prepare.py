"""Raw-photo preparation throughput: photos per second per core at 640x480.

    python -m bench.bench_prepare [--photos 120] [--workers 2] [--out FIGURES.json]

Photos: ``--photos`` JPEGs (quality 90) of 640x480, each scikit-image's astronaut warped by
a random similarity (face 55 to 140 px wide, rotation up to 15 degrees) onto a smooth
random background, written to a temporary folder as one identity per 20 photos.

1. **Per core** (one process, one OpenCV and one onnxruntime thread; photos per CPU-second
   of this process, which other jobs on the machine distort less than wall time): what a
   ``datasets.prepare`` worker does per photo — read the file, decode (EXIF), detect
   (MTCNN, ``--min-size`` 40), choose, align, encode the crop (JPEG 95), perceptual hash —
   and its parts: decode, detection, the rest. Best of ``--repeats``.
2. **Whole command**: ``datasets.preparation.prepare`` with ``--workers`` processes, wall time,
   photos/s (includes worker start-up and writing the outputs).

The goal (issue 18) is at least 25 photos per second per core.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np


def make_photos(root: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` 640x480 JPEGs of the astronaut under random similarity transforms."""
    try:
        from skimage import data
    except ImportError as exc:  # a test requirement, not a runtime one
        raise SystemExit("bench_prepare needs scikit-image (pip install scikit-image)") from exc
    astro = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    eyes_centre = np.array([225.0, 120.0])  # roughly the astronaut's face centre
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        noise = rng.integers(0, 256, (61, 81, 3), dtype=np.uint8)
        canvas = cv2.resize(noise, (640, 480), interpolation=cv2.INTER_CUBIC)
        scale, angle = rng.uniform(0.6, 1.5), rng.uniform(-15, 15)
        m = cv2.getRotationMatrix2D((0, 0), angle, scale)
        m[:, 2] = rng.uniform([180, 140], [460, 340]) - m[:, :2] @ eyes_centre
        cv2.warpAffine(astro, m, (640, 480), dst=canvas, borderMode=cv2.BORDER_TRANSPARENT)
        path = root / f"id{i // 20:03d}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
        paths.append(path)
    return paths


def per_core(paths: list[Path], min_size: float, repeats: int) -> dict[str, float]:
    """Photos per CPU-second of the per-photo work, and of its parts (best of ``repeats``)."""
    from datasets.faces.finder import FaceFinder
    from datasets.faces.options import FaceOptions
    from datasets.faces.photos import decode_photo
    from datasets.preparation import PhotoRecord, PrepareOptions

    cv2.setNumThreads(1)
    options = PrepareOptions(face=FaceOptions(min_size=min_size))
    finder = FaceFinder(options.face, threads=1)
    finder.find_file(paths[0])  # warm-up: first session runs allocate
    best: dict[str, float] = {}
    kept = 0
    for _ in range(repeats):
        t_total = t_decode = t_detect = 0.0
        kept = 0
        for p in paths:
            t0 = time.process_time()
            data = p.read_bytes()
            bgr = decode_photo(data, str(p))
            t1 = time.process_time()
            finder.detect(bgr)
            t2 = time.process_time()
            t_decode += t1 - t0
            t_detect += t2 - t1
            t3 = time.process_time()  # the whole per-photo work, as a worker does it
            r = finder.find_bytes(p.read_bytes(), str(p))
            PhotoRecord.from_result(p.name, r, options)
            t_total += time.process_time() - t3
            kept += r.ok
        n = len(paths)
        figures = {
            "photos_per_core_s": n / t_total,
            "ms_per_photo": 1e3 * t_total / n,
            "decode_ms": 1e3 * t_decode / n,
            "detect_ms": 1e3 * t_detect / n,
            "align_encode_hash_ms": 1e3 * (t_total - t_decode - t_detect) / n,
        }
        if figures["photos_per_core_s"] > best.get("photos_per_core_s", 0.0):
            best = figures
    best["faces_kept"] = kept
    return best


def whole_command(root: Path, out: Path, workers: int, min_size: float) -> dict[str, float]:
    from datasets.faces.options import FaceOptions
    from datasets.preparation import PrepareOptions, prepare

    t = time.perf_counter()
    result = prepare(
        root,
        out,
        PrepareOptions(face=FaceOptions(min_size=min_size)),
        workers=workers,
        progress=False,
    )
    wall = time.perf_counter() - t
    return {
        "workers": workers,
        "photos": result.photos,
        "kept": result.kept,
        "wall_s": wall,
        "photos_per_s": result.photos / wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_prepare", description=__doc__)
    p.add_argument("--photos", type=int, default=120)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--min-size", type=float, default=40.0)
    p.add_argument("--out", help="write the figures here (JSON)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        paths = make_photos(root, a.photos)
        figures: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "opencv": cv2.__version__,
                "load_average": os.getloadavg(),
            },
            "photos": a.photos,
            "size": "640x480",
            "per_core": per_core(paths, a.min_size, a.repeats),
            "whole_command": whole_command(root, Path(tmp) / "out", a.workers, a.min_size),
        }
        figures["machine"]["load_average_after"] = os.getloadavg()
    pc, wc = figures["per_core"], figures["whole_command"]
    print(
        f"per core: {pc['photos_per_core_s']:.1f} photos/s ({pc['ms_per_photo']:.1f} ms: decode "
        f"{pc['decode_ms']:.1f}, detect {pc['detect_ms']:.1f}, align+encode+hash "
        f"{pc['align_encode_hash_ms']:.1f}); kept {pc['faces_kept']} of {a.photos}"
    )
    print(
        f"whole command, {wc['workers']} workers: {wc['photos_per_s']:.1f} photos/s "
        f"({wc['photos']} photos in {wc['wall_s']:.1f} s, kept {wc['kept']})"
    )
    if a.out:
        from common.atomic import write_json

        write_json(a.out, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
