"""Write ``<name>.txt``: the ``state_dict`` keys and shapes of arcface_torch's backbones.

The lists are built from facts read in insightface's
``recognition/arcface_torch/backbones/`` (``iresnet.py``, ``mobilefacenet.py``,
``vit.py``, ``__init__.py``): module names, channel counts, kernel sizes, groups and
which layers have biases or BatchNorm buffers. Nothing here imports or runs their code
or ours; run it from anywhere: ``python tests/data/arcface_torch_keys/make_keys.py``.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
E = 512  # num_features (the embedding size) of every released model


def bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    """BatchNorm1d/2d: affine weight and bias, running statistics, batch counter."""
    return [
        (f"{prefix}.weight", (c,)),
        (f"{prefix}.bias", (c,)),
        (f"{prefix}.running_mean", (c,)),
        (f"{prefix}.running_var", (c,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


# ------------------------------------------------------------------ iresnet.py
def iresnet(layers: tuple[int, int, int, int]) -> list:
    """conv1/bn1/prelu (64); layer1..4 of IBasicBlock with planes 64/128/256/512, the
    first block of each stage strided (2) with a downsample conv1x1 + BN; bn2 (512),
    fc (512*7*7 -> E, with bias), features BatchNorm1d(E). Convs have no bias."""
    keys = [("conv1.weight", (64, 3, 3, 3)), *bn("bn1", 64), ("prelu.weight", (64,))]
    inplanes = 64
    for s, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=True), start=1):
        for i in range(n):
            p = f"layer{s}.{i}"
            keys += bn(f"{p}.bn1", inplanes)
            keys += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3))]
            keys += bn(f"{p}.bn2", planes)
            keys += [
                (f"{p}.prelu.weight", (planes,)),
                (f"{p}.conv2.weight", (planes, planes, 3, 3)),
            ]
            keys += bn(f"{p}.bn3", planes)
            if i == 0:
                keys += [(f"{p}.downsample.0.weight", (planes, inplanes, 1, 1))]
                keys += bn(f"{p}.downsample.1", planes)
            inplanes = planes
    keys += bn("bn2", 512)
    keys += [("fc.weight", (E, 512 * 7 * 7)), ("fc.bias", (E,))]
    keys += bn("features", E)
    return keys


# ------------------------------------------------------------- mobilefacenet.py
def conv_block(p: str, cin: int, cout: int, k: int, groups: int = 1, prelu: bool = True) -> list:
    """ConvBlock (conv, BN, PReLU) or LinearBlock (conv, BN) as ``layers.0/1/2``."""
    keys = [(f"{p}.layers.0.weight", (cout, cin // groups, k, k)), *bn(f"{p}.layers.1", cout)]
    if prelu:
        keys.append((f"{p}.layers.2.weight", (cout,)))
    return keys


def depthwise(p: str, cin: int, cout: int, groups: int) -> list:
    """DepthWise: ConvBlock 1x1 cin->groups, ConvBlock 3x3 groups->groups (groups=groups),
    LinearBlock 1x1 groups->cout."""
    return [
        *conv_block(f"{p}.layers.0", cin, groups, 1),
        *conv_block(f"{p}.layers.1", groups, groups, 3, groups=groups),
        *conv_block(f"{p}.layers.2", groups, cout, 1, prelu=False),
    ]


def residual(p: str, c: int, n: int, groups: int) -> list:
    return [k for i in range(n) for k in depthwise(f"{p}.layers.{i}", c, c, groups)]


def mobilefacenet(blocks: tuple[int, int, int, int], scale: int) -> list:
    """layers.0 ConvBlock 3x3 s2 (3 -> 64s); layers.1: a 3x3 ConvBlock with groups=64
    when blocks[0] == 1, else Residual(64s, blocks[0], groups=128); then DepthWise
    (64s, 64s, 128), Residual(64s, b1, 128), DepthWise(64s, 128s, 256), Residual(128s,
    b2, 256), DepthWise(128s, 128s, 512), Residual(128s, b3, 256); conv_sep ConvBlock
    1x1 (128s -> 512); features (GDC): LinearBlock 7x7 groups=512, Flatten, Linear(512
    -> E, no bias), BatchNorm1d(E)."""
    c1, c2 = 64 * scale, 128 * scale
    keys = conv_block("layers.0", 3, c1, 3)
    if blocks[0] == 1:
        keys += conv_block("layers.1", c1, c1, 3, groups=64)
    else:
        keys += residual("layers.1", c1, blocks[0], 128)
    keys += depthwise("layers.2", c1, c1, 128)
    keys += residual("layers.3", c1, blocks[1], 128)
    keys += depthwise("layers.4", c1, c2, 256)
    keys += residual("layers.5", c2, blocks[2], 256)
    keys += depthwise("layers.6", c2, c2, 512)
    keys += residual("layers.7", c2, blocks[3], 256)
    keys += conv_block("conv_sep", c2, 512, 1)
    keys += conv_block("features.layers.0", 512, 512, 7, groups=512, prelu=False)
    keys += [("features.layers.2.weight", (E, 512)), *bn("features.layers.3", E)]
    return keys


# ---------------------------------------------------------------------- vit.py
def vit(dim: int, depth: int, patches: int = 144, mlp_ratio: int = 4) -> list:
    """pos_embed (1, 144, D) and mask_token (1, 1, D) (module parameters, listed first);
    patch_embed.proj conv 9x9 (3 -> D, with bias); blocks.i: LayerNorm norm1, attn.qkv
    (D -> 3D, qkv_bias=False), attn.proj (D -> D, bias), LayerNorm norm2, mlp.fc1
    (D -> 4D), mlp.fc2 (4D -> D); LayerNorm norm; feature: Linear(144D -> D, no bias),
    BatchNorm1d(D), Linear(D -> E, no bias), BatchNorm1d(E)."""
    keys = [("pos_embed", (1, patches, dim)), ("mask_token", (1, 1, dim))]
    keys += [("patch_embed.proj.weight", (dim, 3, 9, 9)), ("patch_embed.proj.bias", (dim,))]
    hidden = dim * mlp_ratio
    for i in range(depth):
        p = f"blocks.{i}"
        keys += [(f"{p}.norm1.weight", (dim,)), (f"{p}.norm1.bias", (dim,))]
        keys += [(f"{p}.attn.qkv.weight", (3 * dim, dim))]
        keys += [(f"{p}.attn.proj.weight", (dim, dim)), (f"{p}.attn.proj.bias", (dim,))]
        keys += [(f"{p}.norm2.weight", (dim,)), (f"{p}.norm2.bias", (dim,))]
        keys += [(f"{p}.mlp.fc1.weight", (hidden, dim)), (f"{p}.mlp.fc1.bias", (hidden,))]
        keys += [(f"{p}.mlp.fc2.weight", (dim, hidden)), (f"{p}.mlp.fc2.bias", (dim,))]
    keys += [("norm.weight", (dim,)), ("norm.bias", (dim,))]
    keys += [("feature.0.weight", (dim, patches * dim)), *bn("feature.1", dim)]
    keys += [("feature.2.weight", (E, dim)), *bn("feature.3", E)]
    return keys


#: name -> (arcface_torch's name and constructor facts, key list)
MODELS = {
    "r18": ("iresnet18: layers [2, 2, 2, 2]", iresnet((2, 2, 2, 2))),
    "r34": ("iresnet34: layers [3, 4, 6, 3]", iresnet((3, 4, 6, 3))),
    "r50": ("iresnet50: layers [3, 4, 14, 3]", iresnet((3, 4, 14, 3))),
    "r100": ("iresnet100: layers [3, 13, 30, 3]", iresnet((3, 13, 30, 3))),
    "r200": ("iresnet200: layers [6, 26, 60, 6]", iresnet((6, 26, 60, 6))),
    "mbf": ("get_mbf: blocks (1, 4, 6, 2), scale 2", mobilefacenet((1, 4, 6, 2), 2)),
    "mbf_large": ("get_mbf_large: blocks (2, 8, 12, 4), scale 4", mobilefacenet((2, 8, 12, 4), 4)),
    "vit_t": ("vit_t: embed_dim 256, depth 12", vit(256, 12)),
    "vit_s": ("vit_s: embed_dim 512, depth 12", vit(512, 12)),
    "vit_b": ("vit_b: embed_dim 512, depth 24", vit(512, 24)),
    "vit_l": ("vit_l_dp005_mask_005: embed_dim 768, depth 24", vit(768, 24)),
}


def main() -> None:
    for name, (what, keys) in MODELS.items():
        lines = [
            f"# arcface_torch {what}, num_features {E}: state_dict keys and shapes.",
            "# Built by make_keys.py from facts read in insightface's",
            "# recognition/arcface_torch/backbones/ (names, channels, kernels, groups, biases);",
            "# not generated by running any model code. One 'key shape' line each.",
        ]
        lines += [f"{k} {','.join(map(str, s)) or '-'}" for k, s in keys]
        (HERE / f"{name}.txt").write_text("\n".join(lines) + "\n")
        print(name, len(keys))


if __name__ == "__main__":
    main()
