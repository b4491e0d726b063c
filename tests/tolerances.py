"""Unit roundoffs and error bounds for numeric tolerances (docs/testing.md, "Tolerances").

A tolerance is a unit roundoff times a bound derived from the computation it guards:
``gamma(n, dtype)`` is Higham's gamma_n = n u / (1 - n u), the relative error bound of
n successive roundings (a length-n dot product or sum, relative to the sum of the
terms' magnitudes). Round to nearest throughout.
"""

from __future__ import annotations

import torch

U64 = 2.0**-53  # float64 unit roundoff (53-bit significand)
U32 = 2.0**-24  # float32 unit roundoff (24-bit significand)
U16 = 2.0**-11  # float16 unit roundoff (11-bit significand)
UBF16 = 2.0**-8  # bfloat16 unit roundoff (8-bit significand)


def roundoff(dtype: torch.dtype) -> float:
    """The unit roundoff u = eps / 2 of a floating dtype."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float64) -> float:
    """gamma_n = n u / (1 - n u): the error bound of n roundings in ``dtype``."""
    u = roundoff(dtype)
    assert n * u < 1, (n, dtype)
    return n * u / (1 - n * u)
