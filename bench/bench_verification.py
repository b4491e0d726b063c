"""``eval.verification --onnx`` on the CPU against onnxruntime's own time (goal: 1.3x).

Builds (or takes, ``--model``) an ONNX model exported by this project's exporter
(:func:`eval.onnx_export.export_onnx`, random weights) and an LFW-style ``.bin`` of
``--pairs`` random JPEG faces in a temporary folder, then measures, ``--repeats`` times
each, (a) and (b) alternating so that both see the same load:

(a) the command's path: :func:`eval.pair_verification.fastest_batch` picks the batch as
    the command does, then :func:`eval.extract.extract_embeddings` (what
    :func:`eval.pair_verification.verify_pairset` runs: every image and its mirror) over
    the whole set, through :class:`eval.onnx_infer.OnnxEmbedder`;
(b) onnxruntime alone: ``session.run`` of the same session (same threads) over the same
    images, already preprocessed into one float32 array, at the same batch.

Prints one Markdown table: the best time of each, their ratio, and the median ratio of
the paired runs.

    .venv/bin/python -m bench.bench_verification                  # mbf, 300 pairs
    .venv/bin/python -m bench.bench_verification --network r18 --pairs 200
    .venv/bin/python -m bench.bench_verification --model model.onnx --batch 64
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time

import cv2
import numpy as np
import torch

from eval.bin_io import load_bin
from eval.extract import extract_embeddings, normalize_pixels
from eval.models import build_backbone
from eval.onnx_export import export_onnx
from eval.onnx_infer import OnnxEmbedder
from eval.pair_verification import fastest_batch, verify_pairset
from eval.verification import DEFAULT_BATCH


def _write_bin(path: str, pairs: int, side: int, seed: int) -> None:
    """An LFW-style ``.bin``: ``(list of 2P JPEG bytes, list of P bools)``, pickled."""
    rng = np.random.default_rng(seed)
    bins = []
    for _ in range(2 * pairs):
        img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        bins.append(buf.tobytes())
    issame = [bool(i % 2) for i in range(pairs)]
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)


def _model_input(embed: OnnxEmbedder, images: torch.Tensor) -> np.ndarray:
    """The float32 array the path feeds onnxruntime: every image, then its mirror."""
    x = normalize_pixels(images)
    both = torch.cat([x, torch.flip(x, dims=[3])])
    if embed.color == "BGR":
        both = both.flip(1)
    pixels = both * 127.5 + 127.5
    out = ((pixels - embed.mean) / embed.std).numpy().astype(embed.input_dtype)
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1) if embed.layout == "NHWC" else out)


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an ONNX model (default: export --network to a temp dir)")
    p.add_argument("--network", default="mbf", help="backbone exported when --model is unset")
    p.add_argument("--pairs", type=int, default=300)
    p.add_argument("--batch", type=int, default=None, help="default: fastest_batch's choice")
    p.add_argument("--threads", type=int, default=None, help="default: one per usable core")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-verification-") as tmp:
        model = args.model
        if model is None:
            model = os.path.join(tmp, f"{args.network}.onnx")
            torch.manual_seed(0)
            export_onnx(build_backbone(args.network), model, exporter="torchscript")
        bin_path = os.path.join(tmp, "pairs.bin")
        embed = OnnxEmbedder(model, intra_op_threads=args.threads)
        _write_bin(bin_path, args.pairs, embed.input_hw[0], 0)
        pairs = load_bin(bin_path, embed.input_hw)
        t0 = time.perf_counter()
        batch, why = fastest_batch(embed, pairs.images, DEFAULT_BATCH)
        pick_s = time.perf_counter() - t0
        if args.batch is not None:
            batch, why = args.batch, f"onnx batch {args.batch} (given)"
        n = 2 * len(pairs.images)  # every image and its mirror

        def path() -> None:
            extract_embeddings(embed, pairs.images, batch)

        x = _model_input(embed, pairs.images)
        run, feed = embed.session.run, embed.input_name

        def bare() -> None:
            for start in range(0, len(x), batch):
                run([embed.output_name], {feed: x[start : start + batch]})

        bare()  # warm-up
        # (a) and (b) alternate, so that both see the same load on a shared machine
        a_s, b_s = [], []
        for _ in range(args.repeats):
            a_s.append(_seconds(path))
            b_s.append(_seconds(bare))
        a, b = min(a_s), min(b_s)
        ratios = sorted(ta / tb for ta, tb in zip(a_s, b_s, strict=True))
        median = ratios[len(ratios) // 2]
        whole = _seconds(lambda: verify_pairset(embed, pairs, batch, None, 10))
    name = os.path.basename(model) if args.model else f"{args.network} (exported, random weights)"
    print(f"{name}, {args.pairs} pairs ({n} images with mirrors), {why}")
    print(f"batch choice took {pick_s:.2f} s; verify_pairset (embeddings + 10 folds) {whole:.2f} s")
    print("| measured | s | ms per image |")
    print("|---|---:|---:|")
    print(f"| (a) eval.verification's path (extract_embeddings) | {a:.3f} | {1e3 * a / n:.2f} |")
    print(f"| (b) onnxruntime session.run, same batch and threads | {b:.3f} | {1e3 * b / n:.2f} |")
    print(f"| ratio (a) / (b), best of {args.repeats} each | {a / b:.3f}x | |")
    print(f"| ratio (a) / (b), median of the {args.repeats} paired runs | {median:.3f}x | |")


if __name__ == "__main__":
    main()
