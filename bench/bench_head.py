"""Head benchmark: forward+backward time and peak memory growth per rank.

Runs on 2 gloo ranks with one thread each (``--world-size``, ``--threads``),
for C_local classes per rank, B_global samples and D dims, next to
  * the three bare matrix products of the same shapes (the limit), and
  * a straightforward dense head on the same shard (full logits, autograd).

Memory is the growth of the process's peak resident set during one step, with
the peak reset just before it (Linux ``/proc/self/clear_refs``); on CUDA it is
``max_memory_allocated`` growth. Prints one Markdown table (rank 0).

``--backend`` picks the head's implementation (``PartialFC(backend=...)``): ``torch``
(the chunked path), ``triton`` (the fused kernels: CUDA; on the CPU only under
``TRITON_INTERPRET=1``, Triton's interpreter, at toy sizes) or ``auto`` (default:
triton on CUDA when it applies, torch elsewhere).

    .venv/bin/python -m bench.bench_head                  # the issue's grid
    .venv/bin/python -m bench.bench_head --classes 20000 --steps 2   # quick
    python -m bench.bench_head --backend triton --batch 1024      # a CUDA machine
"""

from __future__ import annotations

import argparse
import os
import tempfile
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import (
    bare_products,
    dense_arcface_step,
    head_step,
    interleaved_medians,
    markdown_table,
    peak_growth_mib,
)
from partial_fc import PartialFC, margin_entry, margin_names


def _bench_rank(rank: int, world_size: int, args: argparse.Namespace, init_file: str) -> None:
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu
    device = (
        torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        if cuda
        else torch.device("cpu")
    )
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
    )
    local_batch = args.batch // world_size
    rows = []
    for classes in args.classes:
        generator = torch.Generator().manual_seed(rank)
        x = torch.randn(local_batch, args.dim, generator=generator).to(device)
        labels = torch.randint(0, classes * world_size, (local_batch,), generator=generator).to(
            device
        )

        # The limit: forward logits, gradient to embeddings, gradient to weights.
        w = torch.randn(classes, args.dim, device=device) * 0.01
        xg = torch.randn(args.batch, args.dim, device=device)
        grad_logits = torch.randn(args.batch, classes, device=device)
        dense_w = w.clone().requires_grad_(True)
        steps = {
            "bare": partial(bare_products, xg, w, grad_logits),
            "dense": partial(dense_arcface_step, x, dense_w, labels % classes),
        }
        for rate in args.sample_rates:
            head = PartialFC(
                classes * world_size, args.dim, margin_entry(args.margin).cls(), sample_rate=rate,
                device=device, chunk_classes=args.chunk or None, backend=args.backend,
            )  # fmt: skip
            steps[f"head {rate}"] = partial(head_step, head, x, labels)
        memory = {name: peak_growth_mib(step, device) for name, step in steps.items()}
        times = interleaved_medians(steps, device, args.steps)
        grad_mib = classes * args.dim * 4 / 2**20
        for rate in args.sample_rates:
            name = f"head {rate}"
            rows.append(
                (classes, rate, times[name], times["bare"], times["dense"], memory[name],
                 grad_mib, memory["dense"])
            )  # fmt: skip
        del steps, grad_logits, dense_w
    dist.barrier()
    if rank == 0:
        print(
            f"\nworld size {world_size}, {args.threads} thread(s)/rank, B_global {args.batch}, "
            f"D {args.dim}, device {device.type}, chunk {args.chunk or 'auto'}, "
            f"margin {args.margin}, backend {args.backend} ({head.active_backend})\n"
        )
        header = (
            "C_local", "sample_rate", "head s/step", "3 bare products s", "head / bare",
            "dense s/step", "head mem growth MiB", "/ weight grad", "dense mem growth MiB",
        )  # fmt: skip
        table = markdown_table(
            header,
            (
                (f"{classes:,}", rate, f"{ht:.3f}", f"{bt:.3f}", f"{ht / bt:.2f}x", f"{dt:.3f}",
                 f"{hm:.0f}", f"{hm / gm:.2f}x", f"{dm:.0f}")
                for classes, rate, ht, bt, dt, hm, gm, dm in rows
            ),
        )  # fmt: skip
        print("\n".join(table))
        if args.plot:
            _plot(rows, args.plot)
            print(f"\nplot written to {args.plot}")
    dist.destroy_process_group()


def _plot(rows: list[tuple], path: str) -> None:
    """Time and memory growth against C_local, one line per sample rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for rate in sorted({row[1] for row in rows}, reverse=True):
        mine = [row for row in rows if row[1] == rate]
        classes = [row[0] for row in mine]
        time_ax.plot(classes, [row[2] for row in mine], "o-", label=f"head, sample_rate {rate}")
        mem_ax.plot(classes, [row[5] for row in mine], "o-", label=f"head, sample_rate {rate}")
    bare = sorted({(row[0], row[3], row[6]) for row in rows})
    time_ax.plot([b[0] for b in bare], [b[1] for b in bare], "k--", label="3 bare products")
    mem_ax.plot([b[0] for b in bare], [b[2] for b in bare], "k--", label="weight gradient size")
    time_ax.set(xlabel="C_local", ylabel="seconds per step", title="forward + backward")
    mem_ax.set(xlabel="C_local", ylabel="MiB", title="peak memory growth per rank")
    for ax in (time_ax, mem_ax):
        ax.set_xticks([b[0] for b in bare], [f"{b[0] // 1000}k" for b in bare])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[50_000, 100_000, 200_000],
                        help="C_local values (classes per rank)")  # fmt: skip
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--batch", type=int, default=256, help="B_global")
    parser.add_argument("--dim", type=int, default=512, help="D")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument(
        "--chunk", type=int, default=0, help="chunk_classes (0: the head's automatic choice)"
    )
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even with a GPU")
    parser.add_argument(
        "--margin", choices=margin_names(), default="arcface",
        help="the head's margin, a registered one at its class's defaults (adaface, "
        "curricular, ...: batch-aware margins)",
    )  # fmt: skip
    parser.add_argument(
        "--backend", choices=["auto", "torch", "triton"], default="auto",
        help="the head's implementation (triton: the fused kernels; CUDA, or the CPU "
        "interpreter under TRITON_INTERPRET=1)",
    )  # fmt: skip
    parser.add_argument("--plot", default="", help="write a PNG of time and memory against C_local")
    args = parser.parse_args()
    # Fixed mmap threshold: every large tensor gets its own mapping, returned to the
    # OS when freed, so resident-set growth tracks live tensors (glibc otherwise
    # raises the threshold and recycles freed blocks invisibly).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_bench_rank, args=(args.world_size, args, init_file), nprocs=args.world_size)


if __name__ == "__main__":
    main()
