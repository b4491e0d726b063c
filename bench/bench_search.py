"""Exact 1:N search benchmark: ms per probe over a gallery of random unit templates.

The gallery is ``--gallery`` random 512-d unit rows (float32, 2 GiB at 1M); probes are
searched in batches of ``--probes`` (the command's probe chunk, 256) and one at a time.
Prints one Markdown table.

    .venv/bin/python -m bench.bench_search                      # 1M x 512, top-5
    .venv/bin/python -m bench.bench_search --gallery 100000 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from eval.search import GALLERY_CHUNK, exact_topk


def _gallery(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.empty((n, d), dtype=torch.float32)
    for r0 in range(0, n, 65536):  # bounded temporaries
        block = torch.randn((min(65536, n - r0), d), generator=gen)
        g[r0 : r0 + len(block)] = block / block.norm(dim=1, keepdim=True)
    return g


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--probes", type=int, default=256)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--gallery-chunk", type=int, default=GALLERY_CHUNK)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = _gallery(args.gallery, args.dim, 0)
    probes = _gallery(args.probes, args.dim, 1)
    rows = []
    for label, batch in ((f"batch of {args.probes}", probes), ("one probe", probes[:1])):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            exact_topk(g, batch, args.top_k, gallery_chunk=args.gallery_chunk)
            times.append(time.perf_counter() - t0)
        best = min(times)
        rows.append((label, 1000 * best / len(batch), best))
    print(f"gallery {args.gallery} x {args.dim} float32, top-{args.top_k}, {args.threads} threads")
    print("| probes | ms per probe | s per call |")
    print("|---|---:|---:|")
    for label, ms, s in rows:
        print(f"| {label} | {ms:.2f} | {s:.3f} |")


if __name__ == "__main__":
    main()
