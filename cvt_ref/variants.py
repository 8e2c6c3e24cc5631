"""CvT variants as data: one frozen dataclass per hub checkpoint, in one registry.

Hyperparameters are those of the original code's experiment files
(`experiments/imagenet/cvt/*.yaml` in microsoft/CvT); the published figures are the
original README's tables, kept so reports can put measured numbers beside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

from cvt_ref.errors import CvtError

CropPolicy = Literal["center", "resize"]


@dataclass(frozen=True)
class StageSpec:
    """One of the three stages: a conv token embedding, then `depth` transformer blocks."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    patch_stride: int
    patch_padding: int
    cls_token: bool = False
    kernel_qkv: int = 3
    stride_q: int = 1
    padding_q: int = 1
    stride_kv: int = 2
    padding_kv: int = 1
    mlp_ratio: float = 4.0
    qkv_bias: bool = True


@dataclass(frozen=True)
class Published:
    """Figures from the original README (ImageNet-1k val), for reports; not measured here."""

    params_m: float
    gflops: float
    top1: float


@dataclass(frozen=True)
class Variant:
    name: str
    stages: tuple[StageSpec, ...]
    image_size: int
    crop: CropPolicy
    hub_id: str
    pretrain: Literal["imagenet-1k", "imagenet-22k"]
    published: Published | None = None
    num_classes: int = 1000
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        flags = [s.cls_token for s in self.stages]
        if flags != [False] * (len(flags) - 1) + [True]:
            raise ValueError(f"{self.name}: CvT has a cls token in the last stage only")
        for s in self.stages:
            if s.embed_dim % s.num_heads:
                raise ValueError(f"{self.name}: embed_dim {s.embed_dim} not divisible by heads")

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(s.depth for s in self.stages)

    @property
    def embed_dims(self) -> tuple[int, ...]:
        return tuple(s.embed_dim for s in self.stages)

    @property
    def resize_size(self) -> int:
        """Shorter side before the center crop (224 -> 256), or the square side for 'resize'."""
        if self.crop == "center":
            return int(self.image_size / self.crop_pct)
        return self.image_size

    def at_size(self, image_size: int | None) -> Variant:
        """The variant evaluated at another square resolution (CvT has no position embedding to
        resize). Same name: the weights are the same; the published figures no longer apply."""
        if image_size in (None, self.image_size):
            return self
        return replace(self, image_size=image_size, published=None)

    def with_classes(self, num_classes: int) -> Variant:
        """The variant with another classifier head (a fine-tuned checkpoint's own classes)."""
        if num_classes == self.num_classes:
            return self
        if num_classes < 1:
            raise CvtError(f"{self.name}: a classifier needs at least one class, not {num_classes}")
        return replace(self, num_classes=num_classes, published=None)

    def with_depths(self, *depths: int) -> Variant:
        """A reduced-depth copy (same widths, fewer blocks): quick tests of big variants."""
        stages = tuple(replace(s, depth=d) for s, d in zip(self.stages, depths, strict=True))
        return replace(self, name=f"{self.name}[{','.join(map(str, depths))}]",
                       stages=stages, published=None)

    def hf_config(self) -> dict[str, object]:
        """The matching transformers `CvtConfig` keyword arguments."""
        s = self.stages
        return {
            "num_channels": 3,
            "patch_sizes": [x.patch_size for x in s],
            "patch_stride": [x.patch_stride for x in s],
            "patch_padding": [x.patch_padding for x in s],
            "embed_dim": [x.embed_dim for x in s],
            "num_heads": [x.num_heads for x in s],
            "depth": [x.depth for x in s],
            "mlp_ratio": [x.mlp_ratio for x in s],
            "qkv_bias": [x.qkv_bias for x in s],
            "cls_token": [x.cls_token for x in s],
            "qkv_projection_method": ["dw_bn"] * len(s),
            "kernel_qkv": [x.kernel_qkv for x in s],
            "padding_kv": [x.padding_kv for x in s],
            "stride_kv": [x.stride_kv for x in s],
            "padding_q": [x.padding_q for x in s],
            "stride_q": [x.stride_q for x in s],
            "num_labels": self.num_classes,
        }


def _stages(dims: tuple[int, int, int], heads: tuple[int, int, int],
            depths: tuple[int, int, int]) -> tuple[StageSpec, StageSpec, StageSpec]:
    # Patch embedding: 7x7/4 then 3x3/2 twice; cls token only in the last stage.
    return (
        StageSpec(dims[0], depths[0], heads[0], patch_size=7, patch_stride=4, patch_padding=2),
        StageSpec(dims[1], depths[1], heads[1], patch_size=3, patch_stride=2, patch_padding=1),
        StageSpec(dims[2], depths[2], heads[2], patch_size=3, patch_stride=2, patch_padding=1,
                  cls_token=True),
    )


_CVT13 = _stages((64, 192, 384), (1, 3, 6), (1, 2, 10))
_CVT21 = _stages((64, 192, 384), (1, 3, 6), (1, 4, 16))
_W24 = _stages((192, 768, 1024), (3, 12, 16), (2, 2, 20))


def _variant(name: str, stages: tuple[StageSpec, StageSpec, StageSpec], size: int,
             pretrain: Literal["imagenet-1k", "imagenet-22k"], published: Published) -> Variant:
    return Variant(name=name, stages=stages, image_size=size,
                   crop="center" if size == 224 else "resize", hub_id=f"microsoft/{name}",
                   pretrain=pretrain, published=published)


VARIANTS: Mapping[str, Variant] = MappingProxyType({
    v.name: v for v in (
        _variant("cvt-13", _CVT13, 224, "imagenet-1k", Published(20, 4.5, 81.6)),
        _variant("cvt-13-384", _CVT13, 384, "imagenet-1k", Published(20, 16.3, 83.0)),
        _variant("cvt-13-384-22k", _CVT13, 384, "imagenet-22k", Published(20, 16.3, 83.3)),
        _variant("cvt-21", _CVT21, 224, "imagenet-1k", Published(32, 7.1, 82.5)),
        _variant("cvt-21-384", _CVT21, 384, "imagenet-1k", Published(32, 24.9, 83.3)),
        _variant("cvt-21-384-22k", _CVT21, 384, "imagenet-22k", Published(32, 24.9, 84.9)),
        _variant("cvt-w24-384-22k", _W24, 384, "imagenet-22k", Published(277, 193.2, 87.6)),
    )
})


def get_variant(variant: str | Variant) -> Variant:
    if isinstance(variant, Variant):
        return variant
    try:
        return VARIANTS[variant]
    except KeyError:
        raise CvtError(f"unknown variant {variant!r}; choose one of: "
                       + ", ".join(VARIANTS)) from None


def variants_with_architecture(embed_dims: tuple[int, ...], depths: tuple[int, ...],
                               num_classes: int | None = None) -> list[str]:
    """Names of registered variants whose weights have these shapes (image size aside)."""
    return [v.name for v in VARIANTS.values()
            if v.embed_dims == embed_dims and v.depths == depths
            and (num_classes is None or v.num_classes == num_classes)]
