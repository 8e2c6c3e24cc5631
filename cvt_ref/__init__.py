"""Reference CvT in pure PyTorch: variants, model, weights, preprocessing, labels."""

from __future__ import annotations

from pathlib import Path

from cvt_ref.errors import CvtError, ImageError, WeightsError
from cvt_ref.labels import class_names, imagenet_labels, imagenet_synsets
from cvt_ref.model import Activation, CvT
from cvt_ref.preprocess import bundled_photos, load_image, preprocess, preprocess_batch
from cvt_ref.variants import VARIANTS, Variant, get_variant
from cvt_ref.weights import WeightsSource, check_hf_config, resolve

__all__ = [
    "VARIANTS", "Activation", "CvT", "CvtError", "ImageError", "Variant", "WeightsError",
    "WeightsSource", "bundled_photos", "class_names", "create_model", "get_variant",
    "imagenet_labels", "imagenet_synsets", "load_image", "preprocess", "preprocess_batch",
]


def create_model(variant: str | Variant, weights: str | Path = "random", *,
                 activation: Activation | None = None) -> CvT:
    """The one door to a reference model, in eval mode.

    `activation` defaults to what the checkpoint was trained with: QuickGELU for original
    Microsoft checkpoints, exact GELU for transformers checkpoints and random weights.
    """
    v = get_variant(variant)
    if activation not in (None, "gelu", "quick_gelu"):
        raise CvtError(f"unknown activation {activation!r}; use 'gelu' or 'quick_gelu'")
    load, source, config = resolve(weights)
    if config is not None:
        check_hf_config(config, v, str(source.spec))
    model = CvT(v, activation or source.activation)
    load(model)
    model.weights = source
    return model.eval()
