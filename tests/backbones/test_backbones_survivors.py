"""backbones.weights: wrapper prefixes are stripped only when *every* key has them
(issue 26: a planted bug stripped ``module.`` when any key had it, and the other tests
prefixed all keys or none)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backbones.weights import load_backbone_state, strip_wrapper_prefixes


class _OwnsAModule(nn.Module):
    """A model with a sub-module that happens to be called ``module``."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(3, 2)
        self.fc = nn.Linear(2, 2)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["module.a", "module.b"], ["a", "b"]),
        (["module.a", "b"], ["module.a", "b"]),  # mixed: a sub-module named module
        (["b", "module.a"], ["b", "module.a"]),
        (["_orig_mod.a", "b"], ["_orig_mod.a", "b"]),
        (["module._orig_mod.a", "module._orig_mod.b"], ["a", "b"]),  # nested wrappers
        (["module.module.a", "module.fc.b"], ["module.a", "fc.b"]),  # DDP of such a model
    ],
)
def test_a_prefix_is_stripped_only_when_every_key_has_it(keys, expected) -> None:
    state = {k: torch.tensor(float(i)) for i, k in enumerate(keys)}
    out = strip_wrapper_prefixes(state)
    assert list(out) == expected
    assert [float(v) for v in out.values()] == [float(i) for i in range(len(keys))]


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_model_with_a_sub_module_called_module_loads_its_own_weights(wrapped: bool) -> None:
    torch.manual_seed(0)
    source = _OwnsAModule()
    state = source.state_dict()
    if wrapped:  # as DistributedDataParallel saves it
        state = {f"module.{k}": v for k, v in state.items()}
    target = _OwnsAModule()
    load_backbone_state(target, state)
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
