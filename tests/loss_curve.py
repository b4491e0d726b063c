"""The demo's first training steps as a stored loss curve (``tests/data/loss_curve_demo.json``).

A change that shifts the numbers (the margin, the softmax statistics, the sampler,
the optimizer, initialisation) moves this curve; a refactoring does not. The curve
is the demo preset (``configs/demo``) on a small synthetic dataset generated from a
fixed seed, for :data:`STEPS` steps at a global batch of 64, once on 1 CPU rank and
once on 2 (each rank's BatchNorm sees its own half of the batch, so the two curves
differ and each is stored).

Rewrite the stored curve after a deliberate change of the maths, and say why in the
commit::

    .venv/bin/python -m tests.loss_curve --write
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORED = ROOT / "tests" / "data" / "loss_curve_demo.json"
STEPS = 50
GLOBAL_BATCH = 64
#: identities, images per identity, held-out identities, pairs per fold, seed
DATA = (48, 16, 4, 2, 7)
_LINE = re.compile(r"step (\d+)/\d+ epoch \d+ loss ([0-9.]+) ")


def make_data(root: Path) -> Path:
    """Generate the curve's synthetic dataset into ``root``."""
    from datasets.synthetic import SyntheticConfig, generate

    generate(root, SyntheticConfig(*DATA), workers=0)
    return root


def run(
    data: Path, out: Path, world: int, *overrides: str, threads: int = 1, steps: int = STEPS
) -> list[float]:
    """Train the demo preset for ``steps`` steps on ``world`` CPU ranks with ``threads``
    intra-op threads each; the loss of every step (rank 0's log line: the mean over
    the global batch, printed to 4 decimals)."""
    args = [
        "configs/demo",
        f"data.root={data}",
        f"data.num_classes={DATA[0]}",
        f"data.num_images={DATA[0] * DATA[1]}",
        f"data.batch_size={GLOBAL_BATCH // world}",
        "data.num_workers=0",
        f"train.output={out}",
        f"train.max_steps={steps}",
        "train.epochs=100",
        "checkpoint.every_steps=0",
        "eval.targets=[]",
        "eval.at_start=false",
        "log.every_steps=1",
        "log.tensorboard=false",
        "log.progress_bar=false",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    if world == 1:
        cmd = [sys.executable, "train_dist.py", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            "train_dist.py",
            *args,
        ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    losses = {int(m[1]): float(m[2]) for m in _LINE.finditer((out / "train.log").read_text())}
    if sorted(losses) != list(range(1, steps + 1)):
        raise RuntimeError(
            f"expected steps 1..{steps} in {out / 'train.log'}, got {sorted(losses)}"
        )
    return [losses[s] for s in range(1, steps + 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {STORED.name}")
    parser.add_argument(
        "--noise", action="store_true", help="also print the 1- vs 2-thread difference per step"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data")
        curves = {f"world{w}": run(data, Path(tmp) / f"w{w}", w) for w in (1, 2)}
        print(json.dumps(curves, indent=1))
        if args.noise:  # reduction-order noise: two intra-op threads instead of one
            noisy = run(data, Path(tmp) / "w1t2", 1, threads=2)
            diff = [round(abs(a - b), 4) for a, b in zip(curves["world1"], noisy, strict=True)]
            print(f"|loss(1 thread) - loss(2 threads)| per step: {diff}")
    if args.write:
        STORED.write_text(json.dumps({"steps": STEPS, "data": DATA, **curves}, indent=1) + "\n")
        print(f"wrote {STORED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
