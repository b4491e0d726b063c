"""The bottom layer: helpers every other package may use, importing nothing of ours.

* :mod:`common.atomic` — atomic output files (temporary sibling, fsync, rename);
* :mod:`common.outdir` — output directories a command owns: a manifest that marks
  them, one lock per run, probe files that never follow a symlink;
* :mod:`common.errors` — :class:`~common.errors.UserError`, the base of every expected
  failure (bad input, options or environment);
* :mod:`common.cli` — the one error path of every command: an expected failure is one
  line on stderr and exit code 1 or 2, only a bug prints a traceback;
* :mod:`common.face_input` — the face crop the backbones read (112 pixels, ``(p - 127.5)
  / 127.5``, RGB), stated once for the loaders, the backbone registry and ONNX export.
"""
