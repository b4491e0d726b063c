"""Initial class-centre rows that do not depend on the world size.

Rows are drawn from N(0, std^2) in fixed blocks of global classes, each block
from its own generator seeded by ``(seed, block, *stream)``. A rank draws only
the blocks that overlap its class range, so a class's initial row is the same
on 1 rank or on N, and no rank ever materialises the full matrix.
"""

from __future__ import annotations

import numpy as np
import torch

INIT_BLOCK_CLASSES = 65536


def block_seeded_normal_(
    out: torch.Tensor,
    num_classes: int,
    class_start: int,
    seed: int,
    std: float,
    *,
    rows_per_class: int = 1,
    stream: tuple[int, ...] = (),
    draw_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fill ``out`` (``(num_local * rows_per_class, D)``, classes ``[class_start,
    class_start + num_local)``) in place and return it. ``stream`` separates
    independent uses of one seed; ``draw_dtype`` is the dtype the normals are drawn in."""
    k, dim = rows_per_class, out.shape[1]
    stop = class_start + out.shape[0] // k
    with torch.no_grad():
        for block in range(class_start // INIT_BLOCK_CLASSES, -(-stop // INIT_BLOCK_CLASSES)):
            block_start = block * INIT_BLOCK_CLASSES
            block_rows = min(INIT_BLOCK_CLASSES, num_classes - block_start)
            state = np.random.SeedSequence([seed, block, *stream]).generate_state(1)
            generator = torch.Generator().manual_seed(int(state[0]))
            values = torch.randn(block_rows * k, dim, generator=generator, dtype=draw_dtype) * std
            lo, hi = max(class_start, block_start), min(stop, block_start + block_rows)
            out[(lo - class_start) * k : (hi - class_start) * k] = values[
                (lo - block_start) * k : (hi - block_start) * k
            ]
    return out
