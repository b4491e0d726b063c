"""The process's place in the job: rank, world size, device, process group.

:func:`init_distributed` is the one place that joins a torchrun job: every command
(``train_dist.py``, ``eval.verification``, ``eval.ijb``, ``tools.subcenter_cleaning``)
calls it, never at import time. It picks the device (``cuda:LOCAL_RANK`` with
``nccl`` when CUDA is available, ``cpu`` with ``gloo`` otherwise) and returns a
:class:`DistContext`; collectives then run on tensors of ``DistContext.device``.
The other helpers work the same with or without a process group, so a single
process needs no setup.

Where the ranks come from (:func:`launch_env`): torchrun's ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) when ``RANK`` or ``WORLD_SIZE`` is
set; otherwise, under ``srun`` (one task per GPU), Slurm's ``SLURM_PROCID``,
``SLURM_NTASKS`` and ``SLURM_LOCALID``, with the master address the first host of
``SLURM_JOB_NODELIST`` (expanded here by :func:`expand_hostlist`, no ``scontrol``) and
the port ``MASTER_PORT`` or :func:`slurm_default_port` of ``SLURM_JOB_ID``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from common.errors import UserError


class LaunchEnvError(UserError, ValueError):
    """The launcher's environment variables are missing, malformed or contradict
    each other; the message names them."""


#: The port when ``MASTER_PORT`` is unset under Slurm: ``SLURM_PORT_BASE +
#: SLURM_JOB_ID % SLURM_PORT_SPAN`` (10000..29999), so two jobs sharing a first node
#: rarely collide and every task of one job derives the same port.
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000
#: torch's own default port, used when neither ``MASTER_PORT`` nor ``SLURM_JOB_ID`` is set.
DEFAULT_PORT = 29500

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@dataclass(frozen=True)
class LaunchEnv:
    """The rank layout a launcher gave this process.

    Attributes:
        rank: global rank.
        world_size: number of ranks.
        local_rank: rank on this node.
        master_addr: host of rank 0's TCPStore (``None``: leave torch's ``env://`` as is).
        master_port: its port (``None`` likewise).
        source: ``"torchrun"``, ``"slurm"`` or ``"single"`` (no launcher variables).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    source: str = "single"

    def torch_env(self) -> dict[str, str]:
        """The ``env://`` variables torch reads for this layout."""
        out = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
        }
        if self.master_addr is not None:
            out["MASTER_ADDR"] = self.master_addr
        if self.master_port is not None:
            out["MASTER_PORT"] = str(self.master_port)
        return out


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(spec: str, name: str) -> list[str]:
    """``spec`` split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchEnvError(f"{name}={spec!r}: nested '[' in a host list")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchEnvError(f"{name}={spec!r}: ']' without '[' in a host list")
        elif ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    if depth:
        raise LaunchEnvError(f"{name}={spec!r}: '[' without ']' in a host list")
    parts.append(spec[start:])
    return parts


def _expand_one(item: str, spec: str, name: str) -> list[str]:
    """One host pattern (``prefix[ranges]suffix``, brackets possibly repeated) expanded."""
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    numbers: list[str] = []
    for piece in body.split(","):
        match = _RANGE.match(piece)
        if not match:
            raise LaunchEnvError(f"{name}={spec!r}: {piece!r} is not a number or range N-M")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise LaunchEnvError(f"{name}={spec!r}: range {piece!r} runs backwards")
        width = len(lo)  # Slurm pads to the lower bound's width: [08-10] -> 08, 09, 10
        numbers.extend(f"{n:0{width}d}" for n in range(int(lo), int(hi) + 1))
    tails = _expand_one(rest, spec, name)
    return [prefix + number + tail for number in numbers for tail in tails]


def expand_hostlist(spec: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Slurm's compressed host list expanded in order, as ``scontrol show hostnames``.

    ``"node[01-03,07],gpu5"`` -> ``node01 node02 node03 node07 gpu5``; ranges keep the
    lower bound's zero padding; several bracket groups in one name multiply
    (``r[1-2]n[1-2]`` -> ``r1n1 r1n2 r2n1 r2n2``).

    Raises:
        LaunchEnvError: naming ``name``, for an empty list, unbalanced or nested
            brackets, or a range that is not ``N`` / ``N-M`` with ``N <= M``.
    """
    text = spec.strip()
    if not text:
        raise LaunchEnvError(f"{name} is empty: no host to take the master address from")
    hosts: list[str] = []
    for item in _split_top_level(text, name):
        if not item:
            raise LaunchEnvError(f"{name}={spec!r}: an empty host name in the list")
        hosts.extend(_expand_one(item, spec, name))
    return hosts


def slurm_default_port(job_id: str | None) -> int:
    """The rendezvous port when ``MASTER_PORT`` is unset: derived from ``SLURM_JOB_ID``
    (:data:`SLURM_PORT_BASE` + id mod :data:`SLURM_PORT_SPAN`), else :data:`DEFAULT_PORT`."""
    if job_id is None or not job_id.strip().isdigit():
        return DEFAULT_PORT
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def _int_vars(env: Mapping[str, str], names: tuple[str, ...]) -> dict[str, int]:
    values: dict[str, int] = {}
    for name in names:
        raw = env[name]
        try:
            values[name] = int(raw)
        except ValueError:
            raise LaunchEnvError(f"{name}={raw!r} is not an integer") from None
        if values[name] < 0:
            raise LaunchEnvError(f"{name}={raw!r} is negative")
    return values


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """The rank layout from torchrun's variables, else Slurm's (``srun``), else one rank.

    torchrun's win whenever ``RANK`` or ``WORLD_SIZE`` is set (torchrun inside an
    ``sbatch`` script sees both kinds). Slurm's are used when ``SLURM_PROCID``,
    ``SLURM_NTASKS`` and ``SLURM_LOCALID`` are all set and ``SLURM_NTASKS > 1`` (a batch
    script itself is task 0 of 1 and stays one rank): ``MASTER_ADDR`` or the first host
    of ``SLURM_JOB_NODELIST`` (``SLURM_NODELIST``), ``MASTER_PORT`` or
    :func:`slurm_default_port`.

    Raises:
        LaunchEnvError: naming the variables, when some of a launcher's are missing,
            not non-negative integers, or contradict each other (a rank not below the
            world size, a local rank above the rank).
    """
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [n for n in ("RANK", "WORLD_SIZE") if n not in env]
        if missing:
            have = "RANK" if "RANK" in env else "WORLD_SIZE"
            raise LaunchEnvError(
                f"{have} is set but {missing[0]} is not: torchrun sets RANK, WORLD_SIZE "
                "and LOCAL_RANK together"
            )
        names = tuple(n for n in _TORCHRUN_VARS if n in env)
        v = _int_vars(env, names)
        rank, world = v["RANK"], v["WORLD_SIZE"]
        local = v.get("LOCAL_RANK", 0)
        _check_layout(rank, world, local, ("RANK", "WORLD_SIZE", "LOCAL_RANK"), v)
        port = env.get("MASTER_PORT")
        return LaunchEnv(
            rank,
            world,
            local,
            env.get("MASTER_ADDR"),
            _port(port) if port else None,
            "torchrun",
        )
    present = [n for n in _SLURM_VARS if n in env]
    if not present:
        local = _int_vars(env, ("LOCAL_RANK",))["LOCAL_RANK"] if "LOCAL_RANK" in env else 0
        return LaunchEnv(local_rank=local)
    if len(present) < len(_SLURM_VARS):
        missing = [n for n in _SLURM_VARS if n not in env]
        raise LaunchEnvError(
            f"{', '.join(present)} set but {', '.join(missing)} not: srun sets "
            f"{', '.join(_SLURM_VARS)} together (or launch with torchrun)"
        )
    v = _int_vars(env, _SLURM_VARS)
    rank, world, local = v["SLURM_PROCID"], v["SLURM_NTASKS"], v["SLURM_LOCALID"]
    _check_layout(rank, world, local, _SLURM_VARS, v)
    if world == 1:
        return LaunchEnv(source="single")
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist_name = next(
            (n for n in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(n)), None
        )
        if nodelist_name is None:
            raise LaunchEnvError(
                f"SLURM_NTASKS={world} but neither SLURM_JOB_NODELIST nor MASTER_ADDR is "
                "set: no host for rank 0's rendezvous"
            )
        addr = expand_hostlist(env[nodelist_name], nodelist_name)[0]
    port_text = env.get("MASTER_PORT")
    port = _port(port_text) if port_text else slurm_default_port(env.get("SLURM_JOB_ID"))
    return LaunchEnv(rank, world, local, addr, port, "slurm")


def _check_layout(
    rank: int, world: int, local: int, names: tuple[str, str, str], values: dict[str, int]
) -> None:
    rank_n, world_n, local_n = names
    if world < 1:
        raise LaunchEnvError(f"{world_n}={world}: the world size must be at least 1")
    if rank >= world:
        raise LaunchEnvError(
            f"{rank_n}={rank} is not below {world_n}={world}: ranks run 0..{world - 1}"
        )
    if local_n in values and local > rank:
        raise LaunchEnvError(
            f"{local_n}={local} is above {rank_n}={rank}: a node's local ranks are a "
            "subset of the global ones"
        )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise LaunchEnvError(f"MASTER_PORT={text!r} is not a port number") from None
    if not 0 < port < 65536:
        raise LaunchEnvError(f"MASTER_PORT={text!r} is not a port number (1..65535)")
    return port


def is_distributed(group: ProcessGroup | None) -> bool:
    """True when collectives must run: a process group exists and spans more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world_size(group: ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank in ``group`` (``None``: the default group) and the group's
    size; ``(0, 1)`` without a process group.

    The project's one rank lookup: the head, the losses, the samplers, evaluation and
    the cleaning command all ask here, so "no process group" means one rank everywhere.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


@dataclass(frozen=True)
class DistContext:
    """Rank layout and device of this process.

    Attributes:
        rank: global rank.
        world_size: number of ranks.
        local_rank: rank on this node (selects the CUDA device).
        device: device that holds this rank's model and batches.
        group: process group for collectives (``None`` = default group, if any).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: Any = None

    @property
    def is_main(self) -> bool:
        """True on the rank that logs and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is initialised."""
        return dist.is_available() and dist.is_initialized()

    @classmethod
    def current(cls, device: torch.device | None = None) -> DistContext:
        """Describe this process from the initialised default group (or a single rank)."""
        rank, world = rank_and_world_size(None)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(rank, world, local_rank, device or torch.device("cpu"), None)

    def describe(self) -> str:
        """One line for a command's log: world size, this rank, its device and backend."""
        backend = dist.get_backend(self.group) if self.distributed else "none"
        return (
            f"rank {self.rank} of {self.world_size} (local rank {self.local_rank}) on "
            f"{self.device}, process group backend {backend}"
        )

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""
        if self.distributed:
            dist.barrier(group=self.group)

    def all_reduce_(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        """In-place all-reduce (sum by default); returns ``tensor``."""
        if self.distributed:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=self.group)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, ordered by rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """The device of this rank: ``device`` if given, else ``cuda:local_rank`` / ``cpu``.

    A bare ``"cuda"`` becomes ``cuda:local_rank``: under torchrun every rank must
    drive its own GPU (NCCL refuses two ranks on one device), and ``--device cuda``
    is the natural way to ask for "the GPU". An explicit index is kept as given.

    Raises:
        ValueError: naming ``--device``, for a malformed device or a CUDA device
            that does not exist.
    """
    if device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(
            f"--device {device!r} is not a device (cpu, cuda, cuda:N): {exc}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device!r} means {dev} (LOCAL_RANK={local_rank}), but torch sees "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return dev


def init_distributed(
    device: str | torch.device | None = None, timeout_s: float | None = None
) -> DistContext:
    """Join the job started by torchrun (if any) and describe this process.

    Reads the layout with :func:`launch_env` (torchrun's ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, else Slurm's ``srun`` variables, which are then exported as
    torchrun's so that ``env://`` and :meth:`DistContext.current` see them; default:
    one process). The
    device is :func:`resolve_device` (``--device`` of a command, else
    ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``); a CUDA device is made
    current (``torch.cuda.set_device``), which ``all_gather_object`` and
    ``broadcast_object_list`` need under NCCL. With ``WORLD_SIZE > 1`` and no
    process group yet, the default group is initialised: ``nccl`` bound to that
    device, or ``gloo`` for a CPU device. A group that already exists (a test, or a
    caller that set one up) is used as it is.

    Args:
        device: the command's ``--device``; ``None`` picks as above.
        timeout_s: collective timeout in seconds (``train.collective_timeout_s``):
            a hung or dead peer makes the others fail after it instead of waiting
            forever; ``None`` keeps torch's default.

    Returns:
        the rank layout, the device and the default group (``group=None``).

    Raises:
        LaunchEnvError: the launcher's variables are missing or contradictory.
    """
    launch = launch_env(os.environ)
    if launch.source == "slurm":
        os.environ.update(launch.torch_env())
    local_rank = launch.local_rank
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    world = launch.world_size
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        if backend == "nccl":
            kwargs["device_id"] = dev  # eager NCCL init on this rank's GPU
        dist.init_process_group(backend, **kwargs)
    if dist.is_available() and dist.is_initialized():
        rank, world = rank_and_world_size(None)
    else:
        rank = launch.rank
    return DistContext(rank, world, local_rank, dev, None)


@contextlib.contextmanager
def distributed_command(
    device: str | torch.device | None = None, timeout_s: float | None = None
) -> Iterator[DistContext]:
    """:func:`init_distributed` for the body of a command; on exit the process group
    is destroyed if this call created it (one that existed before is left alone)."""
    existed = dist.is_available() and dist.is_initialized()
    ctx = init_distributed(device, timeout_s)
    try:
        yield ctx
    finally:
        if not existed and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
