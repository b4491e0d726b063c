"""Partial-FC: a class-centre matrix sharded over ranks, with the exact
margin-softmax cross-entropy over all classes (see README, "Using the head")."""

from partial_fc.batch_margins import AdaFace, CurricularFace, ElasticFace, MagFace
from partial_fc.center_loss import ShardedCenterLoss
from partial_fc.head import PartialFC, check_head_options
from partial_fc.margins import (
    ArcFace,
    CombinedMargin,
    CosFace,
    SphereFace,
    adaptive_margins,
    load_margins,
)
from partial_fc.registry import (
    MarginEntry,
    build_margin,
    margin_entry,
    margin_names,
    register_margin,
)
from partial_fc.sharding import class_range
from partial_fc.triplet import TripletLoss

__all__ = [
    "AdaFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ElasticFace",
    "MagFace",
    "MarginEntry",
    "PartialFC",
    "ShardedCenterLoss",
    "SphereFace",
    "TripletLoss",
    "adaptive_margins",
    "build_margin",
    "check_head_options",
    "class_range",
    "load_margins",
    "margin_entry",
    "margin_names",
    "register_margin",
]
