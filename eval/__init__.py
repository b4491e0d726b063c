"""Evaluation and export: ``.bin`` pair verification, IJB-B/C 1:1, ONNX export.

Submodules are imported explicitly (``from eval.verification import verify_targets``);
importing this package loads nothing else. See ``docs/eval.md``.
"""
