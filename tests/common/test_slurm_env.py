"""Where a process's rank comes from: torchrun's variables, else Slurm's (``srun``).

Unit tests of :func:`common.dist.launch_env` and :func:`common.dist.expand_hostlist`
(issue #29, Slurm): the host-list expansion (a property test: a list compressed from
known hosts expands back to them), the mapping, and one-line errors naming the
variables when they are missing or contradict each other.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from common import dist as cdist
from common.dist import (
    LaunchEnv,
    LaunchEnvError,
    expand_hostlist,
    init_distributed,
    launch_env,
    slurm_default_port,
)
from common.errors import UserError

SRUN = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu3",
    "SLURM_JOB_ID": "123456",
}


# ---------------------------------------------------------------- host lists


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("node1", ["node1"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("a[1]-ib,b", ["a1-ib", "b"]),
        ("localhost", ["localhost"]),
    ],
)
def test_expand_hostlist_examples(spec: str, hosts: list[str]) -> None:
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("", "SLURM_JOB_NODELIST is empty"),
        ("node[1-3", r"'\[' without '\]'"),
        ("node1-3]", r"'\]' without '\['"),
        ("node[[1]]", r"nested '\['"),
        ("node[3-1]", "runs backwards"),
        ("node[a-b]", "'a-b' is not a number or range"),
        ("node1,,node2", "an empty host name"),
    ],
)
def test_bad_hostlist_names_the_variable(spec: str, why: str) -> None:
    with pytest.raises(LaunchEnvError, match=why) as info:
        expand_hostlist(spec)
    assert "SLURM_JOB_NODELIST" in str(info.value) and "\n" not in str(info.value)


def _compress(groups: list[tuple[str, int, list[int]]]) -> str:
    """Slurm's compressed form of hosts ``prefix + zero-padded number``: runs of
    consecutive numbers as ``lo-hi``, a group of one host written bare."""
    items = []
    for prefix, width, numbers in groups:
        if len(numbers) == 1:
            items.append(f"{prefix}{numbers[0]:0{width}d}")
            continue
        runs: list[str] = []
        start = prev = numbers[0]
        for n in [*numbers[1:], None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            runs.append(
                f"{start:0{width}d}" if start == prev else f"{start:0{width}d}-{prev:0{width}d}"
            )
            if n is not None:
                start = prev = n
        items.append(f"{prefix}[{','.join(runs)}]")
    return ",".join(items)


host_groups = st.lists(
    st.tuples(
        st.text("abcdefgxyz-", min_size=1, max_size=6).filter(lambda p: not p[-1].isdigit()),
        st.integers(1, 4),
        st.lists(st.integers(0, 999), min_size=1, max_size=12, unique=True).map(sorted),
    ),
    min_size=1,
    max_size=5,
)


@given(host_groups)
def test_expanding_a_compressed_list_gives_the_hosts_back(
    groups: list[tuple[str, int, list[int]]],
) -> None:
    # a number wider than the padding is written in full by both sides ('{n:02d}' of 123)
    groups = [(p, w, [n for n in ns if len(str(n)) <= w] or [0]) for p, w, ns in groups]
    hosts = [f"{p}{n:0{w}d}" for p, w, ns in groups for n in ns]
    assert expand_hostlist(_compress(groups)) == hosts


# ---------------------------------------------------------------- the mapping


def test_no_launcher_is_one_rank() -> None:
    assert launch_env({}) == LaunchEnv()
    assert launch_env({"LOCAL_RANK": "2"}).local_rank == 2


def test_srun_maps_to_the_rank_layout_and_the_first_host() -> None:
    got = launch_env(SRUN)
    assert got == LaunchEnv(5, 8, 1, "gpu07", slurm_default_port("123456"), "slurm")
    assert got.master_port == cdist.SLURM_PORT_BASE + 123456 % cdist.SLURM_PORT_SPAN
    assert got.torch_env() == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(got.master_port),
    }


def test_srun_keeps_a_given_master_and_reads_slurm_nodelist() -> None:
    env = {**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "4242"}
    got = launch_env(env)
    assert (got.master_addr, got.master_port) == ("head", 4242)
    env = {k: v for k, v in SRUN.items() if k not in ("SLURM_JOB_NODELIST", "SLURM_JOB_ID")}
    got = launch_env({**env, "SLURM_NODELIST": "c[2-3]"})
    assert (got.master_addr, got.master_port) == ("c2", cdist.DEFAULT_PORT)


def test_torchrun_variables_win_over_slurm() -> None:
    # torchrun inside an sbatch script: the batch step's Slurm variables are also set
    env = {**SRUN, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h"}
    got = launch_env(env)
    assert got == LaunchEnv(3, 4, 3, "h", None, "torchrun")


def test_batch_script_task_is_one_rank() -> None:
    env = {**SRUN, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    assert launch_env(env) == LaunchEnv()


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"RANK": "1"}, "RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0: the world size must be at least 1"),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "LOCAL_RANK=3 is above RANK=1"),
        ({**SRUN, "SLURM_PROCID": "8"}, "SLURM_PROCID=8 is not below SLURM_NTASKS=8"),
        ({**SRUN, "SLURM_LOCALID": "-1"}, "SLURM_LOCALID='-1' is negative"),
        ({**SRUN, "SLURM_LOCALID": "6"}, "SLURM_LOCALID=6 is above SLURM_PROCID=5"),
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
            "SLURM_PROCID, SLURM_NTASKS set but SLURM_LOCALID not",
        ),
        (
            {k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"},
            "neither SLURM_JOB_NODELIST nor MASTER_ADDR",
        ),
        ({**SRUN, "SLURM_JOB_NODELIST": "gpu[1-"}, "SLURM_JOB_NODELIST='gpu\\[1-'"),
        ({**SRUN, "MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not a port number"),
    ],
)
def test_missing_or_contradictory_variables_are_one_line_errors(
    env: dict[str, str], why: str
) -> None:
    with pytest.raises(LaunchEnvError, match=why) as info:
        launch_env(env)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_init_distributed_exports_the_slurm_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under srun, init_distributed joins with env:// from the Slurm layout: torchrun's
    variables are exported (DistContext.current and torch read them)."""
    for name in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        # set, then removed: monkeypatch then removes what init_distributed exports (a
        # RANK left behind would make every later test in this process wait for peers)
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    for name, value in SRUN.items():
        monkeypatch.setenv(name, value)
    inits: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cdist.dist, "is_initialized", lambda: bool(inits))
    monkeypatch.setattr(cdist.dist, "init_process_group", lambda b, **kw: inits.append(b))
    monkeypatch.setattr(cdist.dist, "get_rank", lambda group=None: int(os.environ["RANK"]))
    monkeypatch.setattr(
        cdist.dist, "get_world_size", lambda group=None: int(os.environ["WORLD_SIZE"])
    )
    ctx = init_distributed()
    assert inits == ["gloo"]
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (5, 8, 1)
    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == str(slurm_default_port("123456"))
