"""The loader section: :class:`datasets.loader.FaceLoader` img/s on a synthetic ``.rec``
generated into a temporary directory, batches delivered to the check's device."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import loader_images_per_s
from bench.gpu_check.clock import Clock
from bench.gpu_check.plan import Plan, check_cap
from datasets.dataset import RecordIODataset
from datasets.synthetic import SyntheticConfig, generate


def run(plan: Plan, clock: Clock, deadline: float, out: dict[str, Any]) -> None:
    """Loader img/s per worker count; appends to ``out["rows"]``."""
    rows: list[dict[str, Any]] = out.setdefault("rows", [])
    with tempfile.TemporaryDirectory(prefix="gpu_check_data_") as tmp:
        root = Path(tmp) / "synthetic"
        config = SyntheticConfig(
            identities=plan.loader_identities,
            images_per_identity=plan.loader_images_per_identity,
            heldout_identities=2,
            pairs_per_fold=2,
        )
        workers = max(1, min(max(plan.loader_workers), os.cpu_count() or 1))
        start = time.perf_counter()
        meta = generate(root, config, workers=workers)
        dataset = RecordIODataset(root / "train.rec")
        out["dataset"] = dict(
            images=meta["num_images"],
            classes=meta["num_classes"],
            jpeg_bytes_mean=(root / "train.rec").stat().st_size / meta["num_images"],
            generated_in_s=time.perf_counter() - start,
        )
        for count in plan.loader_workers:
            check_cap(deadline, f"the loader with {count} workers")
            img_s = loader_images_per_s(
                dataset,
                plan.loader_batch,
                count,
                plan.loader_batches,
                device=str(clock.device),
                warmup=count + 3,  # every worker's first batch lands at once
            )
            rows.append(
                dict(
                    workers=count,
                    batch=plan.loader_batch,
                    timed_batches=plan.loader_batches,
                    device=str(clock.device),
                    img_s=img_s,
                )
            )
            clock.release()
