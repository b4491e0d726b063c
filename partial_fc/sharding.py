"""How the class-centre matrix is split over ranks.

Classes are cut into contiguous ranges, one per rank. The first
``num_classes % world_size`` ranks hold one class more than the others, so the
sizes differ by at most one; with fewer classes than ranks the last ranks hold
none. Every other module derives its class range from :func:`class_range`.
"""

from __future__ import annotations


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return ``(class_start, num_local)``: rank ``rank`` owns classes
    ``[class_start, class_start + num_local)`` of ``num_classes``.

    >>> [class_range(10, r, 4) for r in range(4)]
    [(0, 3), (3, 3), (6, 2), (8, 2)]
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(num_classes, world_size)
    num_local = base + (1 if rank < extra else 0)
    class_start = rank * base + min(rank, extra)
    return class_start, num_local


def owner_of(class_id: int, num_classes: int, world_size: int) -> int:
    """The rank whose range holds ``class_id`` (the inverse of :func:`class_range`)."""
    if not 0 <= class_id < num_classes:
        raise ValueError(f"class_id must be in [0, {num_classes}), got {class_id}")
    base, extra = divmod(num_classes, world_size)
    boundary = extra * (base + 1)  # classes below it sit in the larger ranges
    if class_id < boundary:
        return class_id // (base + 1)
    return extra + (class_id - boundary) // base
