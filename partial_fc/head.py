"""The Partial-FC head: this rank's shard of the class centres and the exact
distributed margin-softmax loss over all of them."""

from __future__ import annotations

import numbers
import warnings
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.distributed import ProcessGroup

from common.dist import rank_and_world_size
from partial_fc.backend import (
    BACKENDS,
    Backend,
    auto_picks_triton,
    interpreter_requested,
    triton_missing,
    triton_unsupported,
)
from partial_fc.collectives import PAD_LABEL, gather_for_loss
from partial_fc.init import block_seeded_normal_
from partial_fc.margins import CombinedMargin, MarginSpec
from partial_fc.sampling import num_sampled_classes, sample_classes, sampling_generator
from partial_fc.sharding import class_range
from partial_fc.softmax_ce import CEOptions, MarginSoftmaxCE

if TYPE_CHECKING:
    from partial_fc.triton_ce import TritonTiles

_INIT_STD = 0.01
# Smaller blocks save little memory and make the matrix products less efficient.
_MIN_AUTO_CHUNK = 4096


def check_head_options(
    *,
    num_subcenters: int = 1,
    sample_rate: float = 1.0,
    chunk_classes: int | None = None,
    interclass_filtering_threshold: float | None = None,
    interclass_filtering_mode: str = "remove",
    names: Mapping[str, str] | None = None,
) -> None:
    """:class:`PartialFC`'s checks of these arguments (its ``__init__`` runs them): a
    ``ValueError`` opening with the argument's name, or with ``names[argument]`` (how a
    configuration calls it)."""
    names = names or {}

    def check(ok: bool, arg: str, rule: str, value: object) -> None:
        if not ok:
            raise ValueError(f"{names.get(arg, arg)}: {rule} (got {value!r})")

    def number(value: object, kind: type = numbers.Real) -> bool:
        return isinstance(value, kind) and not isinstance(value, bool)

    check(
        number(num_subcenters, numbers.Integral) and num_subcenters >= 1,
        "num_subcenters",
        "must be >= 1 (sub-centres per class)",
        num_subcenters,
    )
    check(
        number(sample_rate) and 0.0 < sample_rate <= 1.0,
        "sample_rate",
        "must be in (0, 1]: the fraction of negative class centres sampled per step",
        sample_rate,
    )
    check(
        chunk_classes is None or (number(chunk_classes, numbers.Integral) and chunk_classes >= 1),
        "chunk_classes",
        "must be >= 1 classes per block, or null (the automatic choice)",
        chunk_classes,
    )
    threshold = interclass_filtering_threshold
    check(
        threshold is None or (number(threshold) and -1.0 <= threshold <= 1.0),
        "interclass_filtering_threshold",
        "must be a cosine in [-1, 1], or null (no filtering)",
        threshold,
    )
    check(
        interclass_filtering_mode in ("remove", "zero"),
        "interclass_filtering_mode",
        "must be 'remove' or 'zero'",
        interclass_filtering_mode,
    )


class PartialFC(nn.Module):
    """This rank's shard of a ``num_classes``-way margin-softmax classifier.

    Rank r of ``group`` owns classes ``[class_start, class_start + num_local)``
    (:func:`partial_fc.sharding.class_range`) with ``num_subcenters`` (K) centres
    each: ``weight`` is ``(num_local * K, D)`` and row ``(c - class_start) * K + k``
    is sub-centre k of class c.

    ``forward(local_embeddings (b, D), local_labels (b,) int64) -> loss`` gathers
    the whole group's batch (ranks may hold different ``b``; B = sum of them),
    and returns the exact cross-entropy over all ``num_classes`` classes, averaged
    over the B samples (those not equal to ``ignore_index``); the value is the
    same on every rank. The gradient reaching ``local_embeddings`` is the exact
    gradient of that loss with respect to this rank's rows; ``weight.grad`` is the
    exact gradient of its shard. (A DDP backbone averages its gradients over the
    ranks, so a trainer multiplies the embedding gradient by the world size once.)

    Args:
        num_classes: C, the number of identities over all ranks.
        embedding_size: D.
        margin: the target-logit function (:class:`ArcFace`, :class:`CosFace`, ...).
        num_subcenters: K; a class's cosine is the max over its K sub-centres.
        sample_rate: Partial-FC rate. Below 1, each training step uses all positive
            classes plus random negatives, ``min(num_local, max(round(rate * num_local),
            B))`` classes per rank for a global batch of B (a size fixed by the shapes:
            :mod:`partial_fc.sampling`). Such a step's weight gradient is sparse: a
            COO tensor of the sampled rows only (never a ``(num_local * K, D)``
            allocation); :mod:`partial_fc.optim` updates those rows and leaves the
            others and their state untouched. Evaluation (``eval()`` or no grad)
            always uses every class.
        group: the process group the classes are sharded over (None: the default
            group, or a single process when ``torch.distributed`` is not initialised).
        chunk_classes: classes per logits block; peak extra memory is about one
            ``(B, chunk_classes * K)`` block of cosines. The backward reuses the last
            (full) chunk's block and recomputes the others, so a step costs
            ``3 + (S - chunk) / S`` matrix products for S classes in use. None
            (default): the largest chunk whose block is at most 40% of the weight
            shard's gradient (``0.4 * num_local * D / B`` classes, at least 4096).
        seed: seeds the initial centres (identical for any world size) and the
            negative sampling.
        ignore_index: a label value whose samples are skipped (must lie outside
            ``[0, num_classes)``), or None.
        validate_labels: check every label lies in ``[0, num_classes)`` with an
            asynchronous device-side assert (no host sync; on CUDA a failure surfaces
            at the next synchronising call, on CPU at once as ``RuntimeError``).
        max_local_batch: the largest per-rank batch. Given, every rank pads to it
            and the per-step exchange of batch sizes (a host sync on GPU) is skipped;
            padding rows take no part in the loss. None: sizes are exchanged.
        interclass_filtering_threshold: negatives whose cosine to a sample exceeds
            it are treated as label conflicts (None: off). ``interclass_filtering_mode``
            "remove" drops them from that sample's softmax denominator; "zero" is
            the reference implementation's behaviour (cosine set to 0, so the entry
            still counts as ``exp(0)``). Neither passes gradient to such entries.
        matmul_dtype: ``torch.bfloat16`` or ``torch.float16`` to run the three
            matrix products on tensor cores (GPU); products accumulate in fp32 on
            CUDA and the softmax statistics stay fp32. None: full precision.
        backend: which code computes the non-target logits and their gradients.
            ``"torch"``: the chunked path above, everywhere, every option.
            ``"triton"``: fused Triton kernels that never write a logits block
            (:mod:`partial_fc.triton_ce`): CUDA tensors (or ``TRITON_INTERPRET=1`` on
            the CPU), K = 1, no inter-class filtering, no CurricularFace, fp32/bf16/fp16
            weights; anything else raises ``ValueError`` here, naming it. ``"auto"``
            (default): triton for CUDA weights with bf16/fp16 products when triton
            imports and the options allow it, torch otherwise
            (:func:`partial_fc.backend.auto_picks_triton` says why not fp32). On a CUDA
            device the kernels first check themselves once on a tiny problem
            (:func:`partial_fc.triton_ce.self_test`, here when the weight is created on
            it); should they fail, "auto" warns and stays on torch, "triton" raises.
        triton_tiles: tile sizes of the triton backend (a
            :class:`partial_fc.triton_ce.TritonTiles`); None: chosen from D and dtype.
        device, dtype: of the weight (fp32 by default; the head computes in at
            least fp32 even under autocast).

    Attributes:
        accuracy: 0-dim tensor, top-1 accuracy (target cosine is the largest, over
            the classes in use) of the last forward's valid samples, computed
            across shards without a host sync.
        num_steps: training forwards so far (drives sampling seeds and margin schedules).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: CombinedMargin,
        num_subcenters: int = 1,
        sample_rate: float = 1.0,
        group: ProcessGroup | None = None,
        *,
        chunk_classes: int | None = None,
        seed: int = 0,
        ignore_index: int | None = None,
        validate_labels: bool = True,
        max_local_batch: int | None = None,
        matmul_dtype: torch.dtype | None = None,
        interclass_filtering_threshold: float | None = None,
        interclass_filtering_mode: Literal["remove", "zero"] = "remove",
        backend: Backend = "auto",
        triton_tiles: TritonTiles | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        check_head_options(
            num_subcenters=num_subcenters,
            sample_rate=sample_rate,
            chunk_classes=chunk_classes,
            interclass_filtering_threshold=interclass_filtering_threshold,
            interclass_filtering_mode=interclass_filtering_mode,
        )
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a real class id; use a value outside "
                f"[0, {num_classes})"
            )
        if not isinstance(margin, CombinedMargin):
            raise TypeError(
                f"margin must be a CombinedMargin (ArcFace, CosFace, ...), got {margin!r}"
            )
        self.group = group
        self.rank, self.world_size = rank_and_world_size(group)
        self.num_classes = num_classes
        self.class_start, self.num_local = class_range(num_classes, self.rank, self.world_size)
        self.embedding_size = embedding_size
        self.num_subcenters = num_subcenters
        self.sample_rate = float(sample_rate)
        self.chunk_classes = chunk_classes
        self.seed = seed
        self.ignore_index = ignore_index
        self.validate_labels = validate_labels
        if matmul_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"matmul_dtype must be None, bfloat16 or float16, got {matmul_dtype}")
        self.matmul_dtype = matmul_dtype
        if max_local_batch is not None and max_local_batch < 1:
            raise ValueError(f"max_local_batch must be >= 1, got {max_local_batch}")
        self.max_local_batch = max_local_batch
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.interclass_filtering_mode = interclass_filtering_mode
        margin.check_num_classes(num_classes)
        self.margin = margin
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.triton_tiles = triton_tiles
        # Which options rule the triton backend out (None: it can run this head).
        self._no_triton = triton_unsupported(
            num_subcenters=num_subcenters,
            filtering=interclass_filtering_threshold is not None,
            margin=margin,
            dtype=dtype,
        )
        if backend == "triton" and (triton_missing() or self._no_triton):
            why = triton_missing() or self._no_triton
            raise ValueError(f"backend='triton' cannot run this head: {why}")
        self._self_tests: dict[tuple, str | None] = {}  # (device, dtype) -> problem or None
        self.num_steps = 0
        self.weight = nn.Parameter(
            torch.empty(self.num_local * num_subcenters, embedding_size, device=device, dtype=dtype)
        )
        self.accuracy = torch.zeros((), device=device)
        self.last_sampled: torch.Tensor | None = None
        self.reset_parameters()
        # Sampled steps' gradients are sparse and built coalesced (sorted, unique rows);
        # autograd's accumulation drops that flag. See _mark_coalesced.
        self._single_backward_nnz: int | None = None
        self._fresh_grad: weakref.ref | None = None  # weak: .grad = None must free it
        self.weight.register_post_accumulate_grad_hook(self._mark_coalesced)
        if backend == "triton" and not self.weight.is_cuda and not interpreter_requested():
            raise ValueError(
                f"backend='triton' needs the weight on a CUDA device, got {self.weight.device} "
                "(or TRITON_INTERPRET=1 for Triton's CPU interpreter); use 'auto' or 'torch'"
            )
        self._resolve_backend()  # on a CUDA device: the kernels' self-test, at start-up

    @property
    def active_backend(self) -> Literal["torch", "triton"]:
        """The backend the next step runs: ``backend`` with "auto" decided for the
        weight's current device."""
        return self._resolve_backend()

    def _resolve_backend(self) -> Literal["torch", "triton"]:
        """The backend of the next step (``backend`` with "auto" decided for the
        weight's current device; the self-test runs once per device and dtype)."""
        if self.backend == "torch" or self._no_triton is not None:
            return "torch"
        if not self.weight.is_cuda:
            return "triton" if self.backend == "triton" else "torch"
        if self.backend == "auto" and (
            triton_missing() is not None
            or not auto_picks_triton(self.matmul_dtype or self.weight.dtype)
        ):  # an explicit "triton" checked the import at construction
            return "torch"
        key = (self.weight.device, self.weight.dtype, self.matmul_dtype)
        if key not in self._self_tests:
            from partial_fc.triton_ce import self_test

            self._self_tests[key] = problem = self_test(
                self.weight.device, self.weight.dtype, self.embedding_size, self.matmul_dtype,
                self.triton_tiles,
            )  # fmt: skip
            if problem is not None and self.backend == "auto":
                warnings.warn(
                    f"PartialFC: the triton kernels failed their self-test on "
                    f"{self.weight.device} ({problem}); this head runs on the torch path",
                    stacklevel=2,
                )
        problem = self._self_tests[key]
        if problem is None:
            return "triton"
        if self.backend == "triton":
            raise RuntimeError(
                f"backend='triton': the kernels failed their self-test on {key[0]}: {problem}"
            )
        return "torch"

    def reset_parameters(self) -> None:
        """Draw the centres from N(0, 0.01^2), a class's centre depending only on
        ``(seed, class id)``, so every world size starts from the same global matrix."""
        block_seeded_normal_(
            self.weight, self.num_classes, self.class_start, self.seed, _INIT_STD,
            rows_per_class=self.num_subcenters,
        )  # fmt: skip

    def set_margins(self, margins: MarginSpec, which: str | None = None) -> None:
        """Replace the margin (one value, one per class, or a ``.txt`` file) at run time."""
        self.margin.set_margins(margins, which)

    def set_sample_rate(self, rate: float) -> None:
        """Use ``rate`` (in (0, 1]) from the next training forward on: between steps
        only (a trainer's sampling schedule, :func:`partial_fc.sampling.scheduled_rate`).
        The sampled count S per rank (:func:`partial_fc.sampling.num_sampled_classes`) is
        a host value derived from it, so a change costs no host sync; a step at rate 1.0
        has a dense weight gradient, a sampled step a row-sparse one (the head's
        optimizers take either)."""
        check_head_options(sample_rate=rate)
        self.sample_rate = float(rate)

    def _assert_labels(self, labels: torch.Tensor, real: torch.Tensor) -> None:
        """Device-side check that every real label is a class id (or ignore_index)."""
        bad = real & ((labels < 0) | (labels >= self.num_classes))
        if self.ignore_index is not None:
            bad &= labels != self.ignore_index
        allowed = "" if self.ignore_index is None else f" or ignore_index={self.ignore_index}"
        torch._assert_async(
            ~bad.any(),
            f"PartialFC: a label is outside [0, num_classes={self.num_classes}){allowed}; "
            "check data.num_classes against the dataset's labels",
        )

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=local_embeddings.device.type, enabled=False):
            embeddings, labels, _ = gather_for_loss(
                local_embeddings,
                local_labels,
                self.group,
                pad_to=self.max_local_batch,
                embedding_size=self.embedding_size,
                param_dtype=self.weight.dtype,
            )
            valid = labels != PAD_LABEL
            if self.validate_labels:
                self._assert_labels(labels, valid)
            if self.ignore_index is not None:
                valid &= labels != self.ignore_index
            local = labels - self.class_start
            owned = valid & (local >= 0) & (local < self.num_local)
            local = torch.where(owned, local, torch.zeros_like(local))
            training = self.training and torch.is_grad_enabled()
            sampled = None
            target_col = torch.where(owned, local, torch.full_like(local, -1))
            if training and self.sample_rate < 1.0 and self.num_local > 0:
                sampled, target_col = self._sample(local, owned)
            self.last_sampled = sampled
            if sampled is not None:
                self._single_backward_nnz = sampled.shape[0] * self.num_subcenters
            options = CEOptions(
                margin=self.margin,
                step=self.num_steps,
                num_subcenters=self.num_subcenters,
                chunk_classes=self.chunk_classes
                or self._auto_chunk(
                    embeddings.shape[0], self.num_local if sampled is None else sampled.numel()
                ),
                group=self.group,
                filter_threshold=self.interclass_filtering_threshold,
                filter_mode=self.interclass_filtering_mode,
                matmul_dtype=self.matmul_dtype,
                seed=self.seed,
                training=training,
                backend=self._resolve_backend(),
                triton_tiles=self.triton_tiles,
            )
            loss, correct = MarginSoftmaxCE.apply(
                embeddings,
                self.weight,
                sampled,
                target_col,
                torch.where(valid, labels, torch.zeros_like(labels)),
                valid,
                options,
            )
            self.accuracy = correct.sum() / valid.sum().clamp(min=1)
            if training:
                self.num_steps += 1
        return loss

    def _auto_chunk(self, global_batch: int, num_used: int) -> int:
        """Classes per block: as many as keep the ``(B, chunk * K)`` block at most 40%
        of the weight shard's gradient (at least 4096), so the peak is the gradient
        plus one block and the backward recomputes as few classes as it can."""
        # B * chunk * K <= 0.4 * num_local * K * D: K cancels.
        # An empty global batch (no sample on any rank) has no block: any chunk will do.
        budget = (2 * self.num_local * self.embedding_size) // (5 * max(global_batch, 1))
        return max(1, min(num_used, max(_MIN_AUTO_CHUNK, budget)))

    def _sample(
        self, local: torch.Tensor, owned: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Classes of this step and each sample's column among them (-1: not here)."""
        hits = torch.zeros(self.num_local, dtype=torch.int64, device=local.device)
        hits.index_add_(0, local, owned.to(torch.int64))
        generator = sampling_generator(self.seed, self.num_steps, self.class_start, local.device)
        count = num_sampled_classes(self.num_local, self.sample_rate, local.shape[0])
        sampled = sample_classes(hits > 0, count, generator)
        column_of = torch.full((self.num_local,), -1, dtype=torch.int64, device=local.device)
        column_of[sampled] = torch.arange(sampled.shape[0], device=local.device)
        return sampled, torch.where(owned, column_of[local], torch.full_like(local, -1))

    def _mark_coalesced(self, weight: torch.Tensor) -> None:
        """Restore the coalesced flag of a sampled step's sparse gradient.

        One backward gives sorted, unique rows, but storing it as ``.grad`` rebuilds
        the tensor without the flag, and :func:`partial_fc.sparse_grad.row_gradients`
        would then pay a sort and three passes over the values to merge duplicates that
        are not there. A gradient is one backward's when it is a new tensor (not the
        previous ``.grad`` accumulated into) with that backward's number of rows;
        accumulating into an existing gradient keeps whatever flag the sparse
        addition set (true only when it merged the rows).
        """
        grad = weight.grad
        if grad is None or grad.layout != torch.sparse_coo:
            return
        if self._fresh_grad is not None and self._fresh_grad() is grad:
            return
        self._fresh_grad = weakref.ref(grad)
        if grad._nnz() == self._single_backward_nnz:
            grad._coalesced_(True)

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, class_start={self.class_start}, "
            f"num_local={self.num_local}, embedding_size={self.embedding_size}, "
            f"num_subcenters={self.num_subcenters}, sample_rate={self.sample_rate}, "
            f"chunk_classes={self.chunk_classes}, backend={self.backend}"
        )
