"""Millions of identities on one machine: a full sampled step against its products.

Runs 2 gloo ranks (one thread each) with C = 1M, 2M, 4M identities (C/2 per rank),
Partial FC at ``--sample-rate`` (0.1), B_global 256, D 512, ArcFace, and the head's
SGD with momentum and weight decay (``--state-dtype`` fp32 or bf16 momentum). It
times the full step (forward, backward with the sparse gradient, optimizer) next to
the three bare products of the sampled step's shapes (``X·W_sᵀ``, ``G·W_s``,
``Gᵀ·X`` with S = rate · C_local rows), and reads each rank's peak resident set
(``VmHWM``, reset after set-up) against the size of its fp32 weight shard.

    .venv/bin/python -m bench.bench_scale                        # 1M, 2M, 4M; fp32 state
    .venv/bin/python -m bench.bench_scale --state-dtype bf16 --plot docs/figures/scale.png
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import (
    bare_products,
    interleaved_medians,
    markdown_table,
    proc_status_kib,
    reset_peak_rss,
)
from partial_fc import ArcFace, PartialFC
from partial_fc.optim import PartialFCSGD

_STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _full_step(head: PartialFC, opt: PartialFCSGD, x: torch.Tensor, labels: torch.Tensor):
    opt.zero_grad()
    head(x.clone().requires_grad_(True), labels).backward()
    opt.step()


def _bench_rank(rank: int, world: int, args: argparse.Namespace, identities: int, tmp: str) -> None:
    """One size in fresh processes: memory freed by a previous size's head would
    otherwise stay in the resident set and in the peak."""
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world)  # fmt: skip
    local_batch = args.batch // world
    gc.collect()
    baseline_gib = proc_status_kib("VmRSS") / 2**20  # torch, gloo, Python: before any head
    head = PartialFC(identities, args.dim, ArcFace(), sample_rate=args.sample_rate, seed=0)
    opt = PartialFCSGD(
        head, lr=0.1, momentum=0.9, weight_decay=5e-4,
        state_dtype=_STATE_DTYPES[args.state_dtype],
    )  # fmt: skip
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(local_batch, args.dim, generator=g)
    labels = torch.randint(0, identities, (local_batch,), generator=g)
    sampled = round(args.sample_rate * head.num_local)
    step = partial(_full_step, head, opt, x, labels)
    step()  # the optimizer's state exists from here on, as in a running job
    gc.collect()
    reset_peak_rss()
    step()
    peak_gib = proc_status_kib("VmHWM") / 2**20  # a training step's peak, nothing else
    # The bare products' operands exist only now: they are not part of the peak.
    w_s = torch.randn(sampled, args.dim) * 0.01
    x_g, grad_logits = torch.randn(args.batch, args.dim), torch.randn(args.batch, sampled)
    start = time.perf_counter()
    times = interleaved_medians(
        {"step": step, "bare": partial(bare_products, x_g, w_s, grad_logits)},
        torch.device("cpu"),
        args.steps,
    )
    shard_gib = head.weight.numel() * 4 / 2**30
    peaks = [None] * world
    dist.all_gather_object(peaks, peak_gib)
    baselines = [None] * world
    dist.all_gather_object(baselines, baseline_gib)
    row = dict(
        identities=identities, c_local=head.num_local, sampled=sampled,
        step_s=times["step"], bare_s=times["bare"], peak_gib=max(peaks),
        baseline_gib=max(baselines), shard_gib=shard_gib,
        seconds=time.perf_counter() - start,
    )  # fmt: skip
    if rank == 0:
        Path(tmp, "row.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def _table_cells(r: dict) -> tuple[str, ...]:
    """One size's row of the printed table."""
    above = (r["peak_gib"] - r["baseline_gib"]) / r["shard_gib"]
    return (
        f"{r['identities']:,}", f"{r['c_local']:,}", f"{r['sampled']:,}", f"{r['step_s']:.3f}",
        f"{r['bare_s']:.3f}", f"{r['step_s'] / r['bare_s']:.2f}x", f"{r['peak_gib']:.2f}",
        f"{r['shard_gib']:.2f}", f"{r['peak_gib'] / r['shard_gib']:.2f}x", f"{above:.2f}x",
    )  # fmt: skip


def _report(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\n2 gloo ranks x {args.threads} thread, B_global {args.batch}, D {args.dim}, "
        f"sample_rate {args.sample_rate}, SGD momentum 0.9 + weight decay, "
        f"{args.state_dtype} momentum; medians of {args.steps} steps\n"
    )
    header = (
        "identities", "C_local", "sampled rows", "full step s", "3 bare products s",
        "step / bare", "peak RSS per rank GiB", "fp32 shard GiB", "RSS / shard",
        "(RSS - process baseline) / shard",
    )  # fmt: skip
    print("\n".join(markdown_table(header, map(_table_cells, rows))))
    print(f"\nprocess baseline (torch + gloo, no head): {rows[0]['baseline_gib']:.2f} GiB per rank")
    if args.plot:
        _plot(rows, args)
        print(f"\nplot written to {args.plot}")


def _plot(rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    millions = [r["identities"] / 1e6 for r in rows]
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(10, 4))
    time_ax.plot(millions, [r["step_s"] for r in rows], "o-", label="full step (with optimizer)")
    time_ax.plot(millions, [r["bare_s"] for r in rows], "k--", label="3 bare sampled products")
    mem_ax.plot(millions, [r["peak_gib"] for r in rows], "o-", label="peak RSS per rank")
    mem_ax.plot(millions, [r["shard_gib"] for r in rows], "k--", label="fp32 weight shard")
    time_ax.set(xlabel="identities (millions)", ylabel="seconds per step", title="time")
    mem_ax.set(xlabel="identities (millions)", ylabel="GiB", title="memory per rank")
    for ax in (time_ax, mem_ax):
        ax.set_xticks(millions)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"sample_rate {args.sample_rate}, {args.state_dtype} momentum, 2 ranks")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--identities", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000]
    )
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=256, help="B_global")
    parser.add_argument("--dim", type=int, default=512, help="D")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--state-dtype", choices=sorted(_STATE_DTYPES), default="fp32")
    parser.add_argument("--plot", default="", help="write a PNG of time and memory")
    args = parser.parse_args(argv)
    rows = []
    for identities in args.identities:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_bench_rank, args=(2, args, identities, tmp), nprocs=2, join=True)
            rows.append(json.loads(Path(tmp, "row.json").read_text()))
    _report(rows, args)


if __name__ == "__main__":
    main()
