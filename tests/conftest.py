"""Suite-wide options: the device the device-aware tests run on.

By default every test runs on the CPU and multi-rank tests join gloo ranks. With
``--device cuda`` (or ``PFC_TEST_DEVICE=cuda`` in the environment) the tests marked
``on_device`` (the head, optimizer and trainer tests) put their tensors and modules
on the GPU (the ``device`` fixture below, or :func:`tests.distributed.device_under_test`
inside spawned ranks), and :func:`tests.distributed.run_ranks` joins nccl ranks, one GPU
each; cases with more ranks than GPUs are skipped. Tests that are neither ``on_device``
nor ``gpu`` are skipped in that mode: they would only rerun the CPU suite.

    python -m pytest --device cuda tests/partial_fc/test_partial_fc_optim.py
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.distributed import TEST_DEVICE_ENV, device_under_test

_DEVICES = ("cpu", "cuda")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        choices=_DEVICES,
        default=os.environ.get(TEST_DEVICE_ENV, "cpu"),
        help=f"device of the on_device tests (default: ${TEST_DEVICE_ENV} or cpu); "
        "cuda runs their multi-rank cases on nccl",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "on_device: runs on --device (cuda: nccl ranks, one GPU each); CPU by default",
    )
    device = config.getoption("--device")
    if device not in _DEVICES:  # an unchecked value from the environment
        raise pytest.UsageError(f"{TEST_DEVICE_ENV}={device!r}: expected one of {_DEVICES}")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device")
    # Spawned ranks read the device from the environment (they see no pytest config).
    os.environ[TEST_DEVICE_ENV] = device


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--device") == "cpu":
        return
    skip = pytest.mark.skip(reason="not an on_device test: runs on the CPU only")
    for item in items:
        if item.get_closest_marker("on_device") is None and item.get_closest_marker("gpu") is None:
            item.add_marker(skip)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread (as each spawned rank has): the suite shares 2 cores, and
    oversubscribed OpenMP threads spin. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def device() -> torch.device:
    """The device of this run: ``cpu`` unless ``--device cuda``."""
    return device_under_test()


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``synthetic_data(identities, images_per_identity, heldout=4, pairs_per_fold=2,
    seed=1) -> root``: a synthetic face dataset (RecordIO, ``property``, held-out
    ``.bin``), generated once per session for each set of arguments and shared by the
    tests that ask for it. Tests only read it."""
    from datasets.synthetic import SyntheticConfig, generate

    made: dict[tuple[int, ...], Path] = {}

    def make(
        identities: int,
        images_per_identity: int,
        heldout: int = 4,
        pairs_per_fold: int = 2,
        seed: int = 1,
    ) -> Path:
        key = (identities, images_per_identity, heldout, pairs_per_fold, seed)
        if key not in made:
            root = tmp_path_factory.mktemp("synthetic")
            generate(root, SyntheticConfig(*key), workers=0)
            made[key] = root
        return made[key]

    return make
