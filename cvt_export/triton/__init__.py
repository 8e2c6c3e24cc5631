"""Triton Inference Server: a model repository from an artifact folder, and a local server.

- `repository.write_repository`: `REPO/NAME/config.pbtxt` + `REPO/NAME/1/...` for the native
  runtimes (TensorRT plan, ONNX Runtime, OpenVINO) or the `python` runtime that runs this
  project's own runner inside Triton; optionally an ensemble with the project's preprocessing
  (clients send encoded images) and the model's labels for Triton's classification extension.
  Every config is built as Triton's `ModelConfig` protobuf and checked against the model file.
- `python_model`: the code the python runtime executes (imported from this package, not copied).
- `server`: the `tritonserver` binary from PyPI's `nvidia-pytriton` wheel, started on loopback.

The repository generator reads artifact folders and manifests only.
"""

from cvt_ref.errors import CvtError


class TritonError(CvtError):
    """A repository that cannot be written or does not validate, or a server that cannot start."""


__all__ = ["TritonError"]
