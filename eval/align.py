"""Five-point face alignment onto the standard 112x112 ArcFace template.

The implementation lives in :mod:`datasets.align` (library packages must not import
``eval``, and ``datasets.prepare`` aligns raw photos with it); this module keeps the
evaluation API (``from eval.align import align_face``).
"""

from __future__ import annotations

from datasets.align import ARCFACE_TEMPLATE, align_face, similarity_transform

__all__ = ["ARCFACE_TEMPLATE", "align_face", "similarity_transform"]
