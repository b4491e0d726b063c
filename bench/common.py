"""What the benchmarks share: process memory, device timing, the head's workloads,
loader throughput, a trainer's loader stand-in, the machine's versions, Markdown tables.

Run the benchmarks as modules from the project root (``python -m bench.bench_head``):
as a script, ``bench/`` would come first on ``sys.path`` and this module would shadow
the top-level ``common`` package.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from partial_fc import PartialFC

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ process memory
def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``VmRSS``, ``VmHWM``, ...; Linux only)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Lower this process's peak resident set (``VmHWM``) to its current size (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def peak_growth_mib(step: Callable[[], object], device: torch.device) -> float:
    """Peak memory growth (MiB) of one call of ``step``, after a warm-up call.

    On CUDA the growth of ``max_memory_allocated``; elsewhere of the resident set's peak,
    reset just before the call."""
    step()  # warm-up: allocator, lazy init
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = proc_status_kib("VmRSS")
    reset_peak_rss()
    step()
    return (proc_status_kib("VmHWM") - base) / 1024


# ------------------------------------------------------------------ device timing
def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn`` (no device synchronisation)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(
    steps: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median seconds per call of each function, the calls interleaved round-robin
    ``repeats`` times so that every function sees the same background load (shared
    machines, clock and thermal drift); the device is synchronised around each call."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# ------------------------------------------------------------ the head's workloads
def bare_products(x: torch.Tensor, w: torch.Tensor, grad_logits: torch.Tensor) -> None:
    """The three matrix products a head step cannot avoid, the floor its time is
    measured against: forward logits ``X·Wᵀ``, embedding gradient ``G·W``, weight
    gradient ``Gᵀ·X``."""
    torch.mm(x, w.t())
    torch.mm(grad_logits, w)
    torch.mm(grad_logits.t(), x)


def dense_arcface_step(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    matmul_dtype: torch.dtype | None = None,
) -> None:
    """Forward and backward of a straightforward dense ArcFace head on one shard: full
    logits, autograd. ``matmul_dtype`` (e.g. bf16) rounds the product's operands to it;
    the logits are fp32 either way, as a mixed-precision dense head keeps them for the
    softmax. ``w`` must require grad; its gradient is dropped at the end, so the next
    measurement's baseline holds only the weights and the inputs."""
    xi = x.clone().requires_grad_(True)
    if matmul_dtype is None:
        cos = F.normalize(xi) @ F.normalize(w).t()
    else:
        cos = (F.normalize(xi).to(matmul_dtype) @ F.normalize(w).to(matmul_dtype).t()).float()
    target = cos.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7)
    logits = cos.scatter(1, labels[:, None], torch.cos(torch.acos(target) + 0.5))
    F.cross_entropy(64.0 * logits, labels).backward()
    w.grad = None


def head_step(head: PartialFC, x: torch.Tensor, labels: torch.Tensor) -> None:
    """Forward and backward of ``head`` on ``x``; the weight gradient is dropped at the
    end, as in :func:`dense_arcface_step`."""
    xi = x.clone().requires_grad_(True)
    head(xi, labels).backward()
    head.weight.grad = None


# ------------------------------------------------------------------ data loading
def loader_images_per_s(
    ds: Any, batch: int, workers: int, batches: int, device: str = "cpu", warmup: int = 3
) -> float:
    """Images/s of a :class:`~datasets.loader.FaceLoader` over ``batches`` batches after
    ``warmup`` untimed ones (worker start-up; with many workers their first batches all
    land at once, so the warm-up should exceed the worker count). On CUDA the batches are
    delivered, normalised, to ``device``, and the clock stops after that work is done.
    NaN when ``ds`` holds fewer images than one batch."""
    from datasets.loader import FaceLoader

    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 batch (it starts the clock), got {warmup}")
    loader = FaceLoader(
        ds, batch_size=batch, rank=0, world_size=1, num_workers=workers, device=device
    )
    if len(loader) == 0:
        return float("nan")
    cuda = torch.device(device).type == "cuda"
    done = 0
    epoch = 0
    t0 = None
    while done < batches + warmup:
        loader.set_epoch(epoch)
        for _ in loader:
            done += 1
            if done == warmup:
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
            if done == batches + warmup:
                break
        epoch += 1
    if cuda:
        torch.cuda.synchronize(device)
    return batches * batch / (time.perf_counter() - t0)


class FixedLengthLoader:
    """Just enough of a loader for ``Trainer``'s constructor, which reads only its
    length (the schedule's); benchmarks feed ``Trainer.train_step`` their own batches."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        """Nothing to reshuffle."""

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise RuntimeError("benchmarks feed Trainer.train_step directly")

    def state_dict(self) -> dict[str, Any]:
        """No state: there is no position to resume from."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


# ------------------------------------------------------------------ the machine
def environment(device: torch.device) -> dict[str, Any]:
    """Versions of everything the figures depend on: Python, torch, CUDA, cuDNN, the
    libraries the project uses, on CUDA the GPU, NCCL and driver, and the git commit."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
    }
    for module in ("numpy", "cv2", "pyarrow", "onnx", "onnxruntime", "triton", "pytest"):
        try:
            env[module] = getattr(__import__(module), "__version__", "?")
        except Exception:  # missing, or broken on import: either way not usable here
            env[module] = None
    if device.type == "cuda":
        try:
            props = torch.cuda.get_device_properties(device)
            env["gpu"] = props.name
            env["gpu_capability"] = f"{props.major}.{props.minor}"
            env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            env["gpu_count"] = torch.cuda.device_count()
            env["bf16_supported"] = torch.cuda.is_bf16_supported()
            nccl = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception as exc:  # the measurements will say what is wrong with the device
            env["gpu_error"] = f"{type(exc).__name__}: {exc}"
        env["driver"] = command_output(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        )
    env["git_commit"] = command_output(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"])
    return env


def command_output(argv: list[str]) -> str | None:
    """First line of a command's output, or None when it is missing or fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


# ------------------------------------------------------------------ Markdown
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table's lines: the header, the ``|---|`` rule, one line per row (cells
    already formatted; ``str()`` of anything else)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return lines
