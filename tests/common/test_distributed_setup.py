"""Every torchrun command joins the job through ``common.dist.init_distributed``:
nccl on ``cuda:LOCAL_RANK`` (made current) when CUDA is available, gloo on CPU
otherwise, ``--device`` honoured; the commands' collectives run on tensors of that
device. The library packages never import the trainer or the evaluation code.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from common import dist as td
from common.dist import DistContext, distributed_command, init_distributed
from tests.distributed import run_ranks

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
PACKAGES = ("common", "partial_fc", "backbones", "datasets", "eval", "configs", "trainer")


class FakeGroup:
    """Records ``init_process_group``/``set_device``/``destroy_process_group`` calls
    and answers ``is_initialized`` as a real default group would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cuda: bool) -> None:
        self.inits: list[tuple[str, dict[str, Any]]] = []
        self.set_devices: list[torch.device] = []
        self.destroyed = 0
        self.initialized = False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 4 if cuda else 0)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.set_devices.append(d))
        monkeypatch.setattr(dist, "init_process_group", self._init)
        monkeypatch.setattr(dist, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: int(os.environ["RANK"]))
        monkeypatch.setattr(
            dist, "get_world_size", lambda group=None: int(os.environ["WORLD_SIZE"])
        )
        monkeypatch.setattr(dist, "destroy_process_group", self._destroy)

    def _init(self, backend: str, **kwargs: Any) -> None:
        self.inits.append((backend, kwargs))
        self.initialized = True

    def _destroy(self) -> None:
        self.destroyed += 1
        self.initialized = False


@pytest.fixture
def torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's variables for global rank 7, local rank 3 of world size 8 (the
    numbers only need to differ from each other and be a consistent layout)."""
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")


def test_cuda_picks_nccl_on_local_rank_device(
    monkeypatch: pytest.MonkeyPatch, torchrun_env: None
) -> None:
    fake = FakeGroup(monkeypatch, cuda=True)
    ctx = init_distributed(timeout_s=12.5)
    cuda3 = torch.device("cuda", 3)
    assert ctx == DistContext(7, 8, 3, cuda3, None)
    assert fake.set_devices == [cuda3]  # before the group: object collectives need it
    [(backend, kwargs)] = fake.inits
    assert backend == "nccl"
    assert kwargs["device_id"] == cuda3
    assert kwargs["timeout"].total_seconds() == 12.5


def test_bare_cuda_means_local_rank_and_an_index_is_kept(
    monkeypatch: pytest.MonkeyPatch, torchrun_env: None
) -> None:
    fake = FakeGroup(monkeypatch, cuda=True)
    assert init_distributed("cuda").device == torch.device("cuda", 3)
    fake.initialized = False
    assert init_distributed("cuda:1").device == torch.device("cuda", 1)
    assert fake.set_devices == [torch.device("cuda", 3), torch.device("cuda", 1)]
    assert [b for b, _ in fake.inits] == ["nccl", "nccl"]
    assert "timeout" not in fake.inits[0][1]  # None keeps torch's default


def test_cpu_picks_gloo_and_explicit_cpu_wins_over_cuda(
    monkeypatch: pytest.MonkeyPatch, torchrun_env: None
) -> None:
    fake = FakeGroup(monkeypatch, cuda=False)
    ctx = init_distributed(timeout_s=3)
    assert ctx.device == torch.device("cpu") and (ctx.rank, ctx.world_size) == (7, 8)
    assert fake.inits == [("gloo", {"timeout": fake.inits[0][1]["timeout"]})]  # no device_id
    fake = FakeGroup(monkeypatch, cuda=True)
    ctx = init_distributed("cpu")
    assert ctx.device == torch.device("cpu")
    assert fake.inits == [("gloo", {})] and fake.set_devices == []


def test_bad_device_names_the_option(monkeypatch: pytest.MonkeyPatch, torchrun_env: None) -> None:
    fake = FakeGroup(monkeypatch, cuda=False)
    with pytest.raises(ValueError, match="--device 'gpu' is not a device"):
        init_distributed("gpu")
    with pytest.raises(ValueError, match="--device 'cuda': torch sees no CUDA device"):
        init_distributed("cuda")
    fake = FakeGroup(monkeypatch, cuda=True)
    monkeypatch.setenv("LOCAL_RANK", "5")  # 4 GPUs (see FakeGroup)
    with pytest.raises(ValueError, match=r"--device 'cuda' means cuda:5 \(LOCAL_RANK=5\)"):
        init_distributed("cuda")
    assert fake.inits == [] and fake.set_devices == []


def test_one_process_and_an_existing_group_are_not_initialised_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeGroup(monkeypatch, cuda=False)
    assert init_distributed() == DistContext()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    fake.initialized = True  # a caller (a test, a notebook) made the group already
    assert init_distributed().rank == 2
    assert fake.inits == []


def test_distributed_command_destroys_only_the_group_it_made(
    monkeypatch: pytest.MonkeyPatch, torchrun_env: None
) -> None:
    fake = FakeGroup(monkeypatch, cuda=False)
    with pytest.raises(RuntimeError, match="boom"), distributed_command():
        assert fake.initialized
        raise RuntimeError("boom")
    assert fake.destroyed == 1 and not fake.initialized
    fake.initialized = True
    with distributed_command():
        pass
    assert fake.destroyed == 1  # the caller's group is left alone


def test_train_dist_passes_its_collective_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """train_dist.main joins through init_distributed with train.collective_timeout_s."""
    import train_dist

    seen: dict[str, Any] = {}

    def fake_init(device: Any = None, timeout_s: float | None = None) -> DistContext:
        seen["timeout_s"] = timeout_s
        raise RuntimeError("stop here")

    monkeypatch.setattr(td, "init_distributed", fake_init)
    with pytest.raises(RuntimeError, match="stop here"):
        train_dist.main(
            ["configs/demo", f"train.output={tmp_path}", "train.collective_timeout_s=42.5"]
        )
    assert seen["timeout_s"] == 42.5


# ------------------------------------------------------------------ the one rank lookup


RANK_HOME = ROOT / "common" / "dist.py"  # rank_and_world_size, the one lookup


def _rank_lookups(path: Path) -> list[str]:
    """Calls of ``get_rank``/``get_world_size`` (``dist.get_rank()``, ``get_rank()``, ...)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("get_rank", "get_world_size"):
                found.append(f"{path}:{node.lineno} {name}")
    return found


def test_one_rank_lookup_outside_the_trainer() -> None:
    """Every package asks common.dist.rank_and_world_size (DistContext is built from
    it); no second helper that could disagree about "no process group"."""
    offenders = []
    for package in (*PACKAGES, "tools"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != RANK_HOME:
                offenders += _rank_lookups(path)
    assert not offenders, "\n".join(offenders)
    assert _rank_lookups(RANK_HOME)  # the home itself is seen


def test_rank_lookup_check_sees_calls(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import torch.distributed as dist\nr = dist.get_rank() + get_world_size()\n")
    assert [line.split()[-1] for line in _rank_lookups(probe)] == ["get_rank", "get_world_size"]


# ------------------------------------------------------------------ commands on gloo ranks


@pytest.fixture(scope="module")
def command_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny synthetic dataset (with heldout.bin), a random mbf_tiny backbone and a
    (C, K, D) head, shared by the command tests."""
    from backbones.registry import get_model
    from datasets.synthetic import SyntheticConfig, generate

    root = tmp_path_factory.mktemp("commands")
    classes, dim, k = 3, 512, 2  # verification builds mbf_tiny at its default D
    generate(root / "data", SyntheticConfig(classes, 3, 4, 2, seed=5), workers=0)
    torch.manual_seed(0)
    torch.save(get_model("mbf_tiny", embedding_size=dim).state_dict(), root / "backbone.pt")
    torch.save(torch.randn(classes, k, dim), root / "head.pt")
    return {
        "data": str(root / "data"),
        "bin": str(root / "data" / "heldout.bin"),
        "backbone": str(root / "backbone.pt"),
        "head": str(root / "head.pt"),
    }


def _cleaning_args(inputs: dict[str, str], out: str, *extra: str) -> list[str]:
    return [
        "--head-weights", inputs["head"], "--backbone-checkpoint", inputs["backbone"],
        "--data", inputs["data"], "--network", "mbf_tiny", "--num-workers", "0",
        "--batch-size", "1", "--threshold-degrees", "80", "--output", out, *extra,
    ]  # fmt: skip


def _verification_args(inputs: dict[str, str], out: str, *extra: str) -> list[str]:
    return [
        "--network", "mbf_tiny", "--checkpoint", inputs["backbone"], "--bin", inputs["bin"],
        "--batch-size", "4", "--json", out, *extra,
    ]  # fmt: skip


def _commands_on_ranks(rank: int, world_size: int, inputs: dict[str, str], out: str) -> dict:
    """Run both commands inside a gloo group, recording the device of every tensor a
    collective receives and the context init_distributed handed out."""
    from eval import verification
    from tools import subcenter_cleaning

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    seen: dict[str, Any] = {"devices": [], "contexts": []}
    real_init = td.init_distributed

    def init_spy(*args: Any, **kwargs: Any) -> DistContext:
        ctx = real_init(*args, **kwargs)
        seen["contexts"].append(ctx)
        return ctx

    def spy(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            for a in args:
                if isinstance(a, list):
                    tensors += [t for t in a if isinstance(t, torch.Tensor)]
            seen["devices"] += [(name, str(t.device)) for t in tensors]
            return real(*args, **kwargs)

        return call

    td.init_distributed = init_spy
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast"):
        setattr(dist, name, spy(name, getattr(dist, name)))
    subcenter_cleaning.main(_cleaning_args(inputs, f"{out}/cleaned"))
    results = verification.main(_verification_args(inputs, f"{out}/verification.json"))
    assert dist.is_initialized()  # the commands left the caller's group alone
    return {
        "devices": seen["devices"],
        "contexts": [(c.rank, c.world_size, c.local_rank, str(c.device)) for c in seen["contexts"]],
        "results": results,
    }


def test_commands_run_collectives_on_the_context_device(
    command_inputs: dict[str, str], tmp_path: Path
) -> None:
    from eval import verification
    from tools import subcenter_cleaning

    subcenter_cleaning.main(_cleaning_args(command_inputs, str(tmp_path / "one")))
    single = verification.main(_verification_args(command_inputs, str(tmp_path / "one.json")))
    ranks = run_ranks(_commands_on_ranks, 2, command_inputs, str(tmp_path / "two"))
    for rank, got in enumerate(ranks):
        assert got["contexts"] == [(rank, 2, rank, "cpu")] * 2
        names = {name for name, _ in got["devices"]}
        assert {"all_reduce", "all_gather"} <= names, names  # histogram, embeddings
        assert {device for _, device in got["devices"]} == {"cpu"}
        for name, value in single["heldout"].items():
            assert got["results"]["heldout"][name] == pytest.approx(value, rel=1e-5, abs=1e-6)
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "cleaned" / "report.json").read_text())
    assert {**two, "world_size": 1} == one
    for name in ("train.rec", "train.idx", "removed.tsv"):
        assert (tmp_path / "one" / name).read_bytes() == (
            tmp_path / "two" / "cleaned" / name
        ).read_bytes()


# ------------------------------------------------------------------ GPU: nccl via torchrun


def _torchrun(module: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=1", "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_subcenter_cleaning_under_torchrun_on_cuda(
    command_inputs: dict[str, str], tmp_path: Path
) -> None:
    """Default device under torchrun with CUDA: cuda:LOCAL_RANK; same report as on CPU."""
    from tools import subcenter_cleaning

    subcenter_cleaning.main(
        _cleaning_args(command_inputs, str(tmp_path / "cpu"), "--device", "cpu")
    )
    run = _torchrun(
        "tools.subcenter_cleaning", _cleaning_args(command_inputs, str(tmp_path / "gpu"))
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "rank 0 of 1 (local rank 0) on cuda:0" in run.stderr
    cpu = json.loads((tmp_path / "cpu" / "report.json").read_text())
    gpu = json.loads((tmp_path / "gpu" / "report.json").read_text())
    # cuDNN convolutions round differently: compare what the threshold decides
    for key in ("num_samples", "num_classes", "num_subcenters", "world_size"):
        assert gpu[key] == cpu[key], key
    assert gpu["per_class"]["samples"] == cpu["per_class"]["samples"]
    assert abs(gpu["num_removed"] - cpu["num_removed"]) <= 1


@pytest.mark.gpu
@needs_cuda
def test_verification_under_torchrun_on_cuda(
    command_inputs: dict[str, str], tmp_path: Path
) -> None:
    from eval import verification

    cpu = verification.main(
        _verification_args(command_inputs, str(tmp_path / "cpu.json"), "--device", "cpu")
    )
    run = _torchrun(
        "eval.verification", _verification_args(command_inputs, str(tmp_path / "gpu.json"))
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "[heldout] accuracy-flip" in run.stdout
    assert "rank 0 of 1 (local rank 0) on cuda:0" in run.stderr
    gpu = json.loads((tmp_path / "gpu.json").read_text())
    assert gpu["heldout"]["num_pairs"] == cpu["heldout"]["num_pairs"]
    assert gpu["heldout"]["xnorm"] == pytest.approx(cpu["heldout"]["xnorm"], rel=1e-3, abs=1e-4)
