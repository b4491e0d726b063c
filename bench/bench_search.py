"""1:N search benchmark: ms per probe over a gallery of random unit templates, exact and
with FAISS (``--index``), and the FAISS indexes' recall against exact search.

The gallery is ``--gallery`` random 512-d unit rows (float32, 2 GiB at 1M; seeded).
Exact search (``--index exact``, the default) runs batches of ``--probes`` (the
command's probe chunk, 256) and one probe at a time. A FAISS index (``faiss-hnsw``,
``faiss-ivf``; ``faiss-cpu`` must be installed) is built once (its build time is
reported), then searched with two probe sets of ``--probes`` each, against exact search:

- **mated** probes: a gallery template plus noise, at cosine ``--mate-cos`` (0.7) to it,
  as a real probe of an enrolled person (its top-1 is its mate); recall@1 and @5;
- **random** probes: random unit rows, whose top-5 are the noise of random data (scores
  about 0.15, no structure to index): the worst case of an approximate index, recall@5.

Recall@k: the fraction of the exact top-k templates found in the approximate top-k.
Prints one Markdown table.

    .venv/bin/python -m bench.bench_search                      # exact, 1M x 512, top-5
    .venv/bin/python -m bench.bench_search --gallery 100000 --threads 1
    .venv/bin/python -m bench.bench_search --index faiss-hnsw faiss-ivf --gallery 100000
"""

from __future__ import annotations

import argparse
import time

import torch

from eval.gallery_search import (
    EF_SEARCH,
    GALLERY_CHUNK,
    HNSW_M,
    INDEX_KINDS,
    NPROBE,
    IndexOptions,
    build_index,
    exact_topk,
    import_faiss,
    recall_at_k,
)


def _gallery(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.empty((n, d), dtype=torch.float32)
    for r0 in range(0, n, 65536):  # bounded temporaries
        block = torch.randn((min(65536, n - r0), d), generator=gen)
        g[r0 : r0 + len(block)] = block / block.norm(dim=1, keepdim=True)
    return g


def _mated(g: torch.Tensor, n: int, cos: float, seed: int) -> torch.Tensor:
    """``n`` probes at cosine about ``cos`` to gallery rows picked at random."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(g), generator=gen)[:n]
    noise = torch.randn((len(rows), g.shape[1]), generator=gen)
    noise -= (noise * g[rows]).sum(1, keepdim=True) * g[rows]  # orthogonal to the mate
    noise /= noise.norm(dim=1, keepdim=True)
    return cos * g[rows] + (1 - cos**2) ** 0.5 * noise


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", nargs="+", choices=INDEX_KINDS, default=["exact"])
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--probes", type=int, default=256)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--gallery-chunk", type=int, default=GALLERY_CHUNK)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hnsw-m", type=int, default=HNSW_M)
    p.add_argument("--ef-search", type=int, nargs="+", default=[EF_SEARCH])
    p.add_argument("--nlist", type=int, default=None)
    p.add_argument("--nprobe", type=int, nargs="+", default=[NPROBE])
    p.add_argument("--mate-cos", type=float, default=0.7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    faiss_kinds = [k for k in args.index if k != "exact"]
    if faiss_kinds:
        import_faiss(faiss_kinds[0]).omp_set_num_threads(args.threads)
    g = _gallery(args.gallery, args.dim, 0)
    probes = _gallery(args.probes, args.dim, 1)
    k = args.top_k
    print(f"gallery {args.gallery} x {args.dim} float32, top-{k}, {args.threads} threads")
    if "exact" in args.index:
        print("| probes | ms per probe | s per call |")
        print("|---|---:|---:|")
        for label, batch in ((f"batch of {args.probes}", probes), ("one probe", probes[:1])):
            best = _best(
                lambda b=batch: exact_topk(g, b, k, gallery_chunk=args.gallery_chunk),
                args.repeats,
            )
            print(f"| {label} | {1000 * best / len(batch):.2f} | {best:.3f} |")
    if not faiss_kinds:
        return
    mated = _mated(g, args.probes, args.mate_cos, 2)
    exact_mated = exact_topk(g, mated, k)[1]
    exact_random = exact_topk(g, probes, k)[1]
    gn, mn, rn = g.numpy(), mated.numpy(), probes.numpy()
    print()
    print(
        "| index | build s | ms per probe (batch) | ms (one probe) | mated recall@1 | "
        "mated recall@5 | random recall@5 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in faiss_kinds:
        sweep = args.ef_search if kind == "faiss-hnsw" else args.nprobe
        index = None
        for value in sweep:
            options = IndexOptions(
                kind,
                hnsw_m=args.hnsw_m,
                ef_search=value,
                nlist=args.nlist,
                nprobe=value,
            )
            if index is None:
                index = build_index(gn, options)
            else:
                index.options = options  # the search parameters only: same index
            batch = _best(lambda i=index: i.search(mn, k), args.repeats)
            one = _best(lambda i=index: i.search(mn[:1], k), args.repeats)
            am, ar = index.search(mn, k)[1], index.search(rn, k)[1]
            print(
                f"| {index.describe()} | {index.build_seconds:.1f} | "
                f"{1000 * batch / len(mn):.3f} | {1000 * one:.3f} | "
                f"{recall_at_k(exact_mated, am, 1).recall:.4f} | "
                f"{recall_at_k(exact_mated, am).recall:.4f} | "
                f"{recall_at_k(exact_random, ar).recall:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
