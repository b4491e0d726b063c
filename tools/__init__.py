"""Commands built on the library packages and the trainer (``python -m tools.NAME``).

Unlike ``partial_fc``, ``backbones`` and ``datasets``, modules here may import
``trainer`` and ``eval``: they read trainer checkpoints and join torchrun jobs.
"""
