"""Reference CvT in pure PyTorch: variants, model, weights, preprocessing, labels.

Names that need torch (the model, the weight loaders) load on first use, and preprocessing
imports torch only when it makes a tensor, so that the light parts (variants, labels, errors,
where weights came from) and the project's report and manifest readers import without it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvt_ref.errors import CvtError, ImageError, WeightsError
from cvt_ref.labels import class_names, imagenet_labels, imagenet_synsets
from cvt_ref.preprocess import bundled_photos, load_image, preprocess, preprocess_batch
from cvt_ref.source import Activation, WeightsSource
from cvt_ref.variants import VARIANTS, Variant, get_variant

if TYPE_CHECKING:
    from cvt_ref.model import CvT
    from cvt_ref.weights import check_hf_config, resolve

__all__ = [
    "VARIANTS", "Activation", "CvT", "CvtError", "ImageError", "Variant", "WeightsError",
    "WeightsSource", "bundled_photos", "check_hf_config", "class_names", "create_model", "get_variant",
    "imagenet_labels", "imagenet_synsets", "load_image", "preprocess", "preprocess_batch", "resolve",
]

_LAZY = {"CvT": "cvt_ref.model", "check_hf_config": "cvt_ref.weights", "resolve": "cvt_ref.weights"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cvt_ref' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def create_model(variant: str | Variant, weights: str | Path = "random", *,
                 activation: Activation | None = None, outliers: int = 0, outlier_seed: int = 0) -> CvT:
    """The one door to a reference model, in eval mode.

    `activation` defaults to what the checkpoint was trained with: QuickGELU for original
    Microsoft checkpoints, exact GELU for transformers checkpoints and random weights. The
    number of classes comes from the checkpoint (a fine-tuned head keeps its own), and the
    variant's image size from `variant` (use `Variant.at_size` for another resolution).

    `outliers=K` gives K channels of each rescalable activation in a seeded third of the blocks
    a 10-100x larger range, as trained transformers have, without changing the logits
    (`cvt_ref.rescale.stress`): the stress that per-tensor INT8 must survive.
    """
    from cvt_ref.model import CvT
    from cvt_ref.weights import check_hf_config, resolve

    v = get_variant(variant)
    if activation not in (None, "gelu", "quick_gelu"):
        raise CvtError(f"unknown activation {activation!r}; use 'gelu' or 'quick_gelu'")
    load, source, config, num_classes = resolve(weights)
    if num_classes is not None:
        v = v.with_classes(num_classes)
    if config is not None:
        check_hf_config(config, v, str(source.spec))
    if outliers < 0:
        raise CvtError(f"outliers={outliers}: must be 0 (none) or a number of channels")
    model = CvT(v, activation or source.activation)
    load(model)
    model.weights = source
    if outliers:
        from cvt_ref.rescale import OutlierSpec, stress

        spec = OutlierSpec(outliers, seed=outlier_seed)
        stress(model, spec)
        model.outliers = spec
    return model.eval()
