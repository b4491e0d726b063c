"""The README's "Using the head in your own training loop" example, run as written on
1 and 2 gloo ranks: every step updates exactly the centres of the classes it sampled."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using the head in your own training loop"


def readme_example() -> str:
    """The first Python block after the section heading."""
    text = README.read_text()
    assert SECTION in text, f"README.md lost its section {SECTION!r}"
    block = re.search(r"```python\n(.*?)```", text[text.index(SECTION) :], re.DOTALL)
    assert block is not None, f"no python block under {SECTION!r}"
    return block.group(1)


class _Loader:
    """Two batches of 4 samples (this rank's part); before handing out each batch, and
    at the end, it records ``head.weight`` and the classes the previous step sampled."""

    def __init__(self, namespace: dict, rank: int) -> None:
        self.namespace, self.rank = namespace, rank
        self.weights: list[torch.Tensor] = []
        self.sampled: list[torch.Tensor] = []

    def record(self, after_step: bool) -> None:
        head = self.namespace["head"]
        self.weights.append(head.weight.detach().clone())
        if after_step:
            self.sampled.append(head.last_sampled.clone())

    def __iter__(self):
        g = torch.Generator().manual_seed(100 + self.rank)
        for step in range(2):
            self.record(after_step=step > 0)
            yield torch.randn(4, 16, generator=g), torch.randint(0, 93431, (4,), generator=g)


def _run_example(rank: int, world: int, source: str) -> dict[str, list[torch.Tensor]]:
    torch.manual_seed(rank)
    namespace: dict = {"backbone": torch.nn.Linear(16, 512)}
    loader = namespace["loader"] = _Loader(namespace, rank)
    exec(compile(source, str(README), "exec"), namespace)
    loader.record(after_step=True)
    return {"weights": loader.weights, "sampled": loader.sampled}


@pytest.mark.parametrize("world", [1, 2])
def test_readme_head_example_trains_the_sampled_classes(world: int) -> None:
    source = readme_example()
    for r in run_ranks(_run_example, world, source):
        weights, sampled = r["weights"], r["sampled"]
        assert len(weights) == 3 and len(sampled) == 2  # before step 1, 2, after step 2
        for before, after, classes in zip(weights[:-1], weights[1:], sampled, strict=True):
            moved = (after != before).any(dim=1)
            expected = torch.zeros_like(moved)
            expected[classes] = True  # K = 1: row = local class
            assert 0 < classes.numel() < moved.numel()
            assert torch.equal(moved, expected)
