"""The project's version and the git state of the tree a run comes from.

The version is recorded in every exported model folder (``config.json``); the commit and
dirty flag are logged by experiment tracking. The project is not installed, so the
version lives here, not in package metadata.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: This project's version (bumped by hand with a release).
PROJECT_VERSION = "0.1.0"

#: The project's root (this file's grandparent).
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class GitState:
    """The commit of a working tree and whether it had uncommitted changes; ``commit``
    is ``"unknown"`` outside a git checkout (or without git)."""

    commit: str
    dirty: bool


def git_state(root: str | os.PathLike[str] = PROJECT_ROOT, timeout_s: float = 10.0) -> GitState:
    """The :class:`GitState` of ``root``; never raises (``"unknown"``, not dirty, when
    git is missing, slow or ``root`` is not a checkout)."""

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=timeout_s, check=True
        )
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return GitState("unknown", False)
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return GitState(commit, dirty)
