"""Face-recognition backbones (IResNet, MobileFaceNet, ViT) behind one registry.

>>> from backbones.registry import get_model
>>> model = get_model("r50", embedding_size=512)   # (B, 3, 112, 112) -> (B, 512)

Parameter names and shapes are arcface_torch's: its ``backbone.pth`` files load with
``backbones.weights.load_backbone_weights`` (or ``strict=True``), and ours load into its
code. A model folder written by ``python -m eval.export`` loads with
``backbones.pretrained.from_pretrained(MODEL_DIR)``. See ``docs/backbones.md`` for the
models, their options, their sizes and the weight files.

Importing this package loads nothing else (no torch): each module is imported by name,
so that ``python -m backbones --help`` answers fast.

* :mod:`backbones.registry` — ``get_model``, ``list_models``, ``input_spec``,
  ``group_matcher``;
* :mod:`backbones.weights` — weight files in and out (``load_backbone_weights``,
  ``read_backbone_weights``, ``save_backbone_weights``, ``BackboneWeightsError``);
* :mod:`backbones.pretrained` — model folders (``from_pretrained``, ``is_model_folder``,
  ``ModelFolderError``);
* :mod:`backbones.flops` — ``count_macs``, ``count_parameters``;
* :mod:`backbones.groups` — ``BackboneParts``, ``GroupMatcher``;
* :mod:`backbones.norm` — ``freeze_batchnorm``.
"""
