"""Two torchrun agents as two nodes (2 CPU ranks each, c10d rendezvous) train exactly
like one node with 4 ranks: on loopback, and in two network namespaces joined by a
veth pair where the machine allows it (root and ``ip netns``; ``make multinode-test``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.torchrun_jobs import Job, final_state, free_port, max_abs_diff, run, tiny_dataset
from tests.torchrun_jobs import train_args as _train_args

BATCH = 4  # per rank; 4 ranks -> global batch 16, 4 steps per epoch, 8 steps
TIMEOUT = 300


def train_args(data: Path, out: Path) -> list[str]:
    # dropout exercises the per-rank RNG streams, which must follow the global rank
    return _train_args(data, out, BATCH, "checkpoint.every_steps=4")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("multinode-data"))


@pytest.fixture(scope="module")
def one_node(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference: one agent, 4 ranks."""
    out = tmp_path_factory.mktemp("one-node") / "run"
    run(["--standalone", "--nproc_per_node=4"], train_args(data, out), out.parent / "log", TIMEOUT)
    return final_state(out)


def _two_agents(
    data: Path, out: Path, host: str, per_node: list[dict], logs: Path
) -> tuple[int, int]:
    """Start two agents (``per_node[i]``: ``netns``, ``env``, ``local_addr``) and wait."""
    port = free_port() if per_node[0].get("netns") is None else 29517
    common = [
        "--nnodes=2",
        "--nproc_per_node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={host}:{port}",
        f"--rdzv-id=pfc-{uuid.uuid4().hex[:8]}",
        "--max-restarts=0",
    ]
    jobs = []
    try:
        for i, node in enumerate(per_node):
            extra = []
            if node.get("local_addr"):
                # inside a namespace the host name does not resolve to the node's own
                # address: say which agent hosts the rendezvous store
                extra = [f"--local-addr={node['local_addr']}", f"--rdzv-conf=is_host={i == 0}"]
            jobs.append(
                Job(
                    [*common, *extra],
                    train_args(data, out),
                    logs / f"node{i}.log",
                    env=node.get("env"),
                    netns=node.get("netns"),
                )
            )
        codes = []
        for job in jobs:
            code = job.wait(TIMEOUT)
            if code != 0:
                raise AssertionError(f"{job.log.name} exited with {code}:\n{job.tail()}")
            codes.append(code)
        return codes[0], codes[1]
    finally:
        for job in jobs:
            job.__exit__(None, None, None)


def _check_equal(two: dict, one: dict, report: Path) -> None:
    diff = max_abs_diff(two, one)
    line = f"max abs difference 2 nodes x 2 ranks vs 1 node x 4 ranks: {diff:.3g}"
    report.write_text(line + "\n")
    print(line)
    assert int(two["step"]) == int(one["step"]) == 8
    assert diff <= 1e-6, diff


def test_two_nodes_on_loopback_equal_one_node(data: Path, one_node: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _two_agents(data, out, "127.0.0.1", [{}, {}], tmp_path)
    log = (out / "train.log").read_text()
    assert "4 ranks" in log
    _check_equal(final_state(out), one_node, tmp_path / "equality.txt")


# ----------------------------------------------------------------- namespaces
NS_ADDR = ("10.200.0.1", "10.200.0.2")


def _namespaces_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2 is not installed)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"pfc-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    """Two namespaces joined by a veth pair: ``10.200.0.1/24`` and ``10.200.0.2/24``.
    Deleting a namespace deletes its end of the pair (and with it the other end)."""
    reason = _namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    names = [f"pfc{tag}n0", f"pfc{tag}n1"]
    veths = [f"pfv{tag}a", f"pfv{tag}b"]
    try:
        for ns in names:
            _ip("netns", "add", ns)
        _ip("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for ns, veth, addr in zip(names, veths, NS_ADDR, strict=True):
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield [*names, *veths]
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for veth in veths:  # normally gone with its namespace
            subprocess.run(["ip", "link", "del", veth], capture_output=True)


@pytest.mark.slow
def test_two_nodes_in_network_namespaces_equal_one_node(
    data: Path, one_node: dict, namespaces: list[str], tmp_path: Path
) -> None:
    ns0, ns1, veth0, veth1 = namespaces
    out = tmp_path / "run"
    nodes = [
        {
            "netns": ns,
            "local_addr": addr,
            "env": {"GLOO_SOCKET_IFNAME": veth, "TORCH_CPP_LOG_LEVEL": "ERROR"},
        }
        for ns, veth, addr in ((ns0, veth0, NS_ADDR[0]), (ns1, veth1, NS_ADDR[1]))
    ]
    _two_agents(data, out, NS_ADDR[0], nodes, tmp_path)
    _check_equal(final_state(out), one_node, tmp_path / "equality.txt")
    # the namespaces are gone after the test (checked by the fixture's teardown order)
