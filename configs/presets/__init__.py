"""The shipped presets: every module here is one, named by its file (``demo``,
``ms1mv3_r50``, ...), and exposes ``get_config() -> configs.Config``.

Load one with ``configs.load_config("ms1mv3_r50")`` (also ``configs/ms1mv3_r50``,
``configs/presets/ms1mv3_r50.py``); shared recipe pieces live in :mod:`configs.recipes`.
"""
