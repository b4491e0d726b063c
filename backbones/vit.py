"""Vision Transformer for 112x112 face images, with arcface_torch's layout.

A 9x9 patch embedding (stride 9, ``patch_embed.proj``) turns a 112x112 image
into a 12x12 grid of 144 tokens (the last 4 pixel rows/columns are not
covered). Learned position embeddings (``pos_embed``) are added, ``depth``
pre-norm transformer blocks (``blocks.N``: ``norm1``, multi-head self-attention
``attn.qkv``/``attn.proj`` with no qkv bias, ``norm2``, a ReLU6 MLP
``mlp.fc1``/``mlp.fc2``, each branch with a residual connection and optional
stochastic depth) follow, then a final LayerNorm (``norm``, eps 1e-5). There is
no class token: the embedding head (``feature``) flattens all 144 tokens,
``FC(144*dim -> dim) -> BN1d -> FC(dim -> E) -> BN1d`` (no bias, BN eps 2e-5,
no activation between).

Token masking (training only): with ``mask_ratio > 0`` each sample keeps
``int(144 * (1 - mask_ratio))`` random tokens through the blocks and the final
LayerNorm; the dropped positions are then filled with the learned ``mask_token``
so the head still sees 144 tokens. In eval mode nothing is masked.
"""

from __future__ import annotations

import torch
from torch import nn

from backbones.checkpointing import run_blocks
from backbones.precision import run_fp32
from common.face_input import ARCFACE_INPUT

#: arcface_torch's epsilons: every LayerNorm, and the BatchNorms of the embedding head.
_LN_EPS = 1e-5
_HEAD_BN_EPS = 2e-5


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability
    ``p`` in training, scaling the survivors by ``1 / (1 - p)``.
    Shape-preserving ``(B, ...)``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention without qkv bias, ``(B, N, dim) -> (B, N, dim)``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d_head)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc1 -> ReLU6 -> fc2``, ``(B, N, dim) -> (B, N, dim)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, ``(B, N, dim) -> (B, N, dim)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches as tokens: ``(B, 3, H, W) -> (B, (H/p)*(W/p), dim)``."""

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def feature_head(cin: int, dim: int, embedding_size: int) -> nn.Sequential:
    """``FC(cin -> dim) -> BN1d -> FC(dim -> E) -> BN1d`` as ``0``..``3``, no bias and
    no activation: ``(B, cin) -> (B, E)``."""
    return nn.Sequential(
        nn.Linear(cin, dim, bias=False),
        nn.BatchNorm1d(dim, eps=_HEAD_BN_EPS),
        nn.Linear(dim, embedding_size, bias=False),
        nn.BatchNorm1d(embedding_size, eps=_HEAD_BN_EPS),
    )


class VisionTransformer(nn.Module):
    """ViT backbone for faces (arcface_torch's ``VisionTransformer`` layout and names).

    Maps ``(B, 3, 112, 112)`` images in [-1, 1] to ``(B, embedding_size)``
    embeddings (not L2-normalised).

    Args:
        embedding_size: output dimension.
        dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        patch_size: side of the square patches (9 gives 12x12 tokens).
        drop_path_rate: stochastic depth of the last block (linear ramp from 0).
        mask_ratio: fraction of tokens dropped in training (0 disables).
        checkpoint: checkpoint the activations of every block in training.
        input_size: side of the square input.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        dim: int = 256,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        patch_size: int = 9,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.1,
        checkpoint: bool = False,
        input_size: int = ARCFACE_INPUT.size,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.checkpoint = checkpoint
        self.embedding_size = embedding_size
        self.mask_ratio = mask_ratio
        grid = input_size // patch_size
        self.num_tokens = grid * grid
        self.patch_embed = PatchEmbed(dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.feature = feature_head(dim * self.num_tokens, dim, embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm | nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, N, dim)`` patch tokens plus positions."""
        return self.patch_embed(x) + self.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, embedding_size)`` float32."""
        x = self._tokens(x)
        b, n, d = x.shape
        n_keep = int(n * (1 - self.mask_ratio)) if self.training else n
        if n_keep < n:
            order = torch.rand(b, n, device=x.device).argsort(dim=1)
            keep = order[:, :n_keep].unsqueeze(-1).expand(-1, -1, d)
            kept = run_blocks(self.blocks, x.gather(1, keep), self.checkpoint)
            normed = self.norm(kept)  # float32 under autocast too (LayerNorm)
            # the mask tokens fill the dropped positions after the final norm
            x = self.mask_token.to(normed.dtype).expand(b, n, d).scatter(1, keep, normed)
        else:
            x = self.norm(run_blocks(self.blocks, x, self.checkpoint and self.training))
        return run_fp32(self.feature, x.flatten(1))
