"""``python -m tools.slurm``: write a filled-in ``train.sbatch`` (see tools/slurm)."""

from __future__ import annotations

import sys

from tools.slurm import main

if __name__ == "__main__":
    from common.cli import run_main

    sys.exit(run_main(main, prog="tools.slurm"))
