"""One-command check of a CUDA machine: the CUDA tests, the head, training steps, the loader.

    PYTHON=python3 make gpu-check          # python -m bench.gpu_check --out work_dirs/gpu_check
    make gpu-check-smoke                   # python -m bench.gpu_check --smoke (CPU, tiny sizes)

Meant for a machine with one CUDA GPU whose system Python already has the project's
requirements, without network access: nothing is installed. Five sections, each with
its own time cap (checked between measurements) inside an overall budget of 8 minutes:

``head``
    :class:`partial_fc.PartialFC` forward+backward on one process (no process group)
    at B 1024, D 512, C_local 64k and 256k, sample rates 1.0 and 0.1, fp32 and bf16
    products, next to the three bare products of the same shapes (``X·Wᵀ``, ``G·W``,
    ``Gᵀ·X``, :func:`bench.common.bare_products`; bf16 operands for the bf16 rows) and a dense
    head (full logits and autograd; bf16 operands, fp32 logits for the bf16 rows). Medians of
    interleaved calls timed with CUDA events; memory is the growth of
    ``max_memory_allocated`` during one call, next to the weight gradient's size. Each
    configuration runs the head's torch backend and, where triton imports, its triton
    backend (``PartialFC(backend="triton")``, the fused kernels), whose memory beyond the
    weight gradient is reported apart.
``triton``
    An autotune of the triton backend's tiles at C_local 256k, B 1024, D 512, bf16
    products: each forward-kernel and each weight-gradient-kernel candidate timed alone
    (compile or resource errors recorded), then a whole step (forward + backward, no
    margin or collectives) with the best of each, in both embedding-gradient layouts
    (``dx_in_forward``: from the forward's ``P V``, four products; or recomputed in the
    backward, five), next to the three bare bf16 products; the best tiles are written as
    ``recommended_tiles``.
``train``
    ``Trainer.train_step`` for r50 and r100 at batch 256 with bf16 autocast and bf16
    head products (100k classes, the ``ms1mv3_r50`` recipe otherwise), with and without
    channels_last, on random uint8 batches already on the GPU (normalised on the device
    each step, as the loader does): img/s over the timed steps and peak allocated memory.
``loader``
    :class:`datasets.loader.FaceLoader` on a synthetic ``.rec`` generated into a
    temporary directory, with 8 and 14 workers, batches delivered to the GPU: img/s.
``tests``
    ``pytest -m gpu`` over the suite, then the head, optimizer, trainer and triton-head
    tests with ``--device cuda`` (nccl at world size 1); "not run" when pytest is not
    installed.

Writes ``gpu_check.json`` and ``gpu_check.md`` (and the pytest logs) to ``--out``,
rewritten after every section, with the torch, CUDA and GPU versions. Each section
records its own error and the next one runs; the exit status is 1 if any section
failed or hit its time cap. Goals (``goals.toml``, each with the issue that set it) are
printed as pass/fail next to the figures; they do not change the exit status.

``--smoke`` runs the same code on the CPU at tiny sizes (mbf_tiny instead of the
IResNets, pytest only collecting), timed with ``time.perf_counter`` and with memory
reported as null, so that ``make test`` keeps this script from rotting. There the triton
backend runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here), far too
slow for the head section's rows, which are skipped (the report says so); the triton
section runs one tile configuration at toy size.

The package: :mod:`.plan` (sizes, time caps, the overall budget), :mod:`.clock`
(timing on the device), :mod:`.sections` (one module per section), :mod:`.goals`
(``goals.toml`` judged against the figures), :mod:`.report` (``gpu_check.json`` and
``gpu_check.md``) and :mod:`.__main__` (the command: runs the sections in order).
"""
