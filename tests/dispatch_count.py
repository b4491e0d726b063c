"""Count the operators a piece of code dispatches, and those that would make the
host wait for the device.

On CPU nothing ever waits, so the tests count the operators that *would* block
on CUDA: reading a value back (``aten._local_scalar_dense``, behind ``.item()``,
``bool(tensor)``, ``int(tensor)``, ``.tolist()`` on a device tensor), operators
whose output shape depends on the data (``nonzero``, ``masked_select``, boolean
indexing, ``unique``, ``bincount``, ``repeat_interleave`` without an output
size), comparisons that return a Python bool (``equal``, ``is_nonzero``), and
copies from a non-CPU device to the CPU. A training step that dispatches none of
them runs on a GPU without stalling its stream.

    with DispatchCounter() as counter:
        step()
    assert counter.host_syncs == [], counter.host_syncs
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Operator overloads that read device memory on the host or whose output shape
#: depends on tensor values (so CUDA must synchronise to allocate it).
HOST_SYNC_OPS = frozenset(
    {
        aten._local_scalar_dense.default,
        aten.is_nonzero.default,
        aten.equal.default,
        aten.nonzero.default,
        aten.nonzero_numpy.default,
        aten.argwhere.default,
        aten.masked_select.default,
        aten._unique.default,
        aten._unique2.default,
        aten.unique_dim.default,
        aten.unique_consecutive.default,
        aten.bincount.default,
        aten.repeat_interleave.Tensor,
        aten.repeat_interleave.self_Tensor,
        aten._assert_scalar.default,
    }
)

_BOOL_INDEXED = frozenset({aten.index.Tensor, aten.index_put.default, aten.index_put_.default})


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _is_device_to_host(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if func is aten._to_copy.default:
        source, target = args[0], kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and not source.is_cpu
    if func is aten.copy_.default:
        target, source = args[0], args[1]
        return target.is_cpu and isinstance(source, torch.Tensor) and not source.is_cpu
    return False


class DispatchCounter(TorchDispatchMode):
    """Counts every ATen operator dispatched inside the ``with`` block (autograd's
    backward included) and records those that would synchronise with a GPU.

    Attributes:
        ops: ``Counter`` of operator overload names.
        host_syncs: names of the synchronising operators, in dispatch order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.host_syncs: list[str] = []

    @property
    def total(self) -> int:
        """Operators dispatched so far."""
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = str(func)
        self.ops[name] += 1
        if (
            func in HOST_SYNC_OPS
            or (func in _BOOL_INDEXED and _has_bool_index(args))
            or _is_device_to_host(func, args, kwargs)
        ):
            self.host_syncs.append(name)
        return func(*args, **kwargs)
