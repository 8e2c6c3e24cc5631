"""The reference CvT, top to bottom as in the paper's figure 2.

image -> [ConvEmbedding -> Block x depth] x 3 stages -> LayerNorm(cls token) -> Linear

Export-minded choices (same numbers as the original code and transformers):
- attention is written as two MatMuls and a Softmax (quantizers skip Einsum);
- the 1/sqrt(d) scale multiplies q before its MatMul (fewer elements than the scores);
- token <-> image reshapes never name the batch size, so a dynamic batch exports cleanly;
- no Python control flow depends on tensor values.

Module names follow the original code's (`blocks.N.attn.conv_proj_q.conv`, `mlp.fc1`...),
so original checkpoints load with a stage-prefix rename only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cvt_ref.source import Activation, WeightsSource

if TYPE_CHECKING:
    from cvt_ref.rescale import OutlierSpec
from cvt_ref.variants import StageSpec, Variant

LN_EPS = 1e-5


class QuickGELU(nn.Module):
    """The original code's activation, x * sigmoid(1.702 x); its checkpoints were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: Activation) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; use 'gelu' or 'quick_gelu'")


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C], as channels-last then a reshape: the token map is the image
    in NHWC, the layout OpenVINO runs convolutions in, and it compiles this order with fewer
    copies (cvt-13 INT8 per-batch models: 0.91x the time at batch 1, 0.88x at batch 8 of
    flatten-then-transpose; FP32 and ONNX Runtime unchanged within 3%)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def to_image(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W]: the inverse of `to_tokens`."""
    return torch.unflatten(x, 1, (h, w)).permute(0, 3, 1, 2)


class ConvEmbedding(nn.Module):
    """Overlapping strided convolution that turns an image (or the previous stage's map) into tokens."""

    def __init__(self, in_channels: int, spec: StageSpec) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, spec.embed_dim, kernel_size=spec.patch_size,
                              stride=spec.patch_stride, padding=spec.patch_padding)
        self.norm = nn.LayerNorm(spec.embed_dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2], x.shape[-1]
        return self.norm(to_tokens(x)), h, w


class ConvProjection(nn.Module):
    """Depthwise conv + BatchNorm over the token map: the 'convolutional projection' of q, k or v."""

    def __init__(self, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=kernel, stride=stride, padding=padding,
                              groups=dim, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_tokens(self.bn(self.conv(x)))

    @torch.no_grad()
    def fold_batchnorm(self) -> None:
        """Fold the running-statistics BatchNorm into the conv (a bias appears, BN goes away)."""
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):
            return
        assert bn.running_var is not None and bn.running_mean is not None
        # float64 so the folded weights are the exact product, rounded once.
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        conv = self.conv
        weight = conv.weight.double() * scale[:, None, None, None]
        bias = bn.bias.double() - bn.running_mean.double() * scale
        conv.weight.copy_(weight.to(conv.weight.dtype))
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
        self.bn = nn.Identity()


class ConvAttention(nn.Module):
    """Multi-head attention whose q, k, v come from conv projections of the token map.

    k and v are projected with stride 2 (4x fewer tokens); the cls token skips the conv
    projection and joins q, k and v just before the linear projections. The scale is
    embed_dim ** -0.5 of the whole stage, not of one head: the original code's choice.
    """

    def __init__(self, spec: StageSpec) -> None:
        super().__init__()
        dim = spec.embed_dim
        self.num_heads = spec.num_heads
        self.scale = dim ** -0.5
        self.with_cls_token = spec.cls_token
        self.conv_proj_q = ConvProjection(dim, spec.kernel_qkv, spec.stride_q, spec.padding_q)
        self.conv_proj_k = ConvProjection(dim, spec.kernel_qkv, spec.stride_kv, spec.padding_kv)
        self.conv_proj_v = ConvProjection(dim, spec.kernel_qkv, spec.stride_kv, spec.padding_kv)
        self.proj_q = nn.Linear(dim, dim, bias=spec.qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=spec.qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=spec.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, heads, T, C/heads]."""
        return torch.unflatten(x, -1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if self.with_cls_token:
            cls, x = x[:, :1], x[:, 1:]
        image = to_image(x, h, w)
        q = self.conv_proj_q(image)
        k = self.conv_proj_k(image)
        v = self.conv_proj_v(image)
        if self.with_cls_token:
            q = torch.cat((cls, q), dim=1)
            k = torch.cat((cls, k), dim=1)
            v = torch.cat((cls, v), dim=1)
        q = self.split_heads(self.proj_q(q)) * self.scale
        k = self.split_heads(self.proj_k(k))
        v = self.split_heads(self.proj_v(v))
        attn = F.softmax(torch.matmul(q, k.transpose(-2, -1)), dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).flatten(2)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: Activation) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, spec: StageSpec, activation: Activation) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.embed_dim, eps=LN_EPS)
        self.attn = ConvAttention(spec)
        self.norm2 = nn.LayerNorm(spec.embed_dim, eps=LN_EPS)
        self.mlp = Mlp(spec.embed_dim, int(spec.embed_dim * spec.mlp_ratio), activation)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    """Conv token embedding, an optional cls token, then the blocks; returns the map and cls."""

    def __init__(self, in_channels: int, spec: StageSpec, activation: Activation) -> None:
        super().__init__()
        self.embed = ConvEmbedding(in_channels, spec)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim)) if spec.cls_token else None
        self.blocks = nn.ModuleList(Block(spec, activation) for _ in range(spec.depth))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, h, w = self.embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x, h, w)
        if self.cls_token is None:
            return to_image(x, h, w), None
        return to_image(x[:, 1:], h, w), x[:, 0]


class CvT(nn.Module):
    """forward(x: float32[B, 3, H, W], normalized) -> logits float32[B, num_classes]."""

    def __init__(self, variant: Variant, activation: Activation = "gelu") -> None:
        super().__init__()
        self.variant = variant
        self.activation: Activation = activation
        self.weights: WeightsSource | None = None  # set by create_model: where the weights came from
        self.outliers: OutlierSpec | None = None   # set by create_model: the outlier stress applied
        stages, in_channels = [], 3
        for spec in variant.stages:
            stages.append(Stage(in_channels, spec, activation))
            in_channels = spec.embed_dim
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(in_channels, eps=LN_EPS)
        self.head = nn.Linear(in_channels, variant.num_classes)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output map, then the final cls token: for locating numeric drift."""
        outputs, cls = [], None
        for stage in self.stages:
            x, cls = stage(x)
            outputs.append(x)
        assert cls is not None  # the last stage always carries the cls token
        outputs.append(cls)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.forward_stages(x)[-1]
        # Indexing (not squeeze) keeps [B, C] at batch 1: the original code's squeeze bug.
        return self.head(self.norm(cls))

    def fold_batchnorm(self) -> CvT:
        """Fold every q/k/v BatchNorm into its depthwise conv, in place (inference only)."""
        for module in self.modules():
            if isinstance(module, ConvProjection):
                module.fold_batchnorm()
        return self
