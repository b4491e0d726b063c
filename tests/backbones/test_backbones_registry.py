"""Each registered backbone's facts: its input spec and the group matcher that splits its
parameters into stem, residual units and head."""

from __future__ import annotations

import pytest
import torch

from backbones.groups import GroupMatcher
from backbones.registry import get_model, group_matcher, input_spec, list_models
from common.face_input import ARCFACE_INPUT


def _names(network: str) -> tuple[list[str], list[str]]:
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation cost
        model = get_model(network)
    return [n for n, _ in model.named_parameters()], [n for n, _ in model.named_buffers()]


@pytest.mark.parametrize("network", list_models())
def test_every_parameter_is_in_exactly_one_of_stem_units_and_head(network: str) -> None:
    groups = group_matcher(network)
    params, buffers = _names(network)
    for name in params + buffers:  # BatchNorm statistics too: freezing reads them
        assert len(groups.kinds(name)) == 1, (name, groups.kinds(name))
    parts = groups.parts(params)
    assert parts.stem and parts.units and parts.head
    in_units = [n for n in params if groups.group(n) in parts.units]
    assert sorted(parts.stem + in_units + parts.head) == sorted(params)
    # units in forward (registration) order; the stem comes first and the head last
    first = {
        unit: min(i for i, n in enumerate(params) if groups.group(n) == unit)
        for unit in parts.units
    }
    assert sorted(parts.units, key=first.__getitem__) == parts.units
    assert params.index(parts.stem[-1]) < params.index(in_units[0])
    assert params.index(in_units[-1]) < params.index(parts.head[0])


def test_a_name_in_no_part_is_an_error() -> None:
    matcher = GroupMatcher(stem=r"stem\..+", units=(r"(blocks\.\d+)\..+",), head=r"fc\..+")
    assert matcher.group("blocks.3.weight") == "blocks.3"
    assert matcher.kinds("fc.bias") == ["head"]
    with pytest.raises(ValueError, match=r"'extra\.weight' is in none of"):
        matcher.parts(["stem.weight", "extra.weight"])


@pytest.mark.parametrize("network", ["r18", "mbf_tiny", "vit_t"])
def test_every_model_reads_its_input_spec(network: str) -> None:
    spec = input_spec(network)
    assert spec == ARCFACE_INPUT and (spec.size, spec.mean, spec.std) == (112, 127.5, 127.5)
    model = get_model(network, embedding_size=16).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, spec.size, spec.size)).shape == (2, 16)


def test_unknown_networks_have_no_facts() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'r7'"):
        input_spec("r7")
    with pytest.raises(ValueError, match="unknown backbone 'r7'"):
        group_matcher("r7")
