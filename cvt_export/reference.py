"""The reference: the FP32 PyTorch model an artifact folder was exported from.

Not a backend: it is what every backend is judged against (the benchmark, the accuracy pass, the
regression gate, tune, deploy and the served model's checks all build it here).
"""

from __future__ import annotations

from pathlib import Path

from cvt_export.artifacts import ArtifactFolder, as_folder
from cvt_ref.errors import WeightsError
from cvt_ref.model import CvT


def reference_model(folder: ArtifactFolder | str | Path) -> CvT:
    """The FP32 PyTorch model an artifact folder was exported from (weights checked by sha256)."""
    import cvt_ref

    folder = as_folder(folder)
    weights, stress = folder.weights, folder.source.outliers
    model = cvt_ref.create_model(folder.variant, weights.spec, activation=weights.activation,
                                 outliers=stress.channels if stress else 0,
                                 outlier_seed=stress.seed if stress else 0)
    if model.weights is not None and weights.sha256 and model.weights.sha256 != weights.sha256:
        raise WeightsError(f"reference: {weights.spec} is not the file {folder.path} was exported from "
                           "(sha256 differs); re-export or pass the original weights")
    return model
