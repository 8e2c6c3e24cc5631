"""What the `python` runtime runs inside Triton: this project's runner and preprocessing.

Tensors cross the Python-backend stub by DLPack, never by `as_numpy()`/`Tensor(name, array)`:
the stub in PyPI's nvidia-pytriton 0.7 wheel is built against NumPy 1.x, and under NumPy 2 its
array conversions misread the data (measured: [[1,2,3],[4,5,6]] arrived as [[1,1,1],[1,1,1]];
a BYTES tensor crashed the stub). DLPack carries dtype, shape and strides itself. For the same
reason encoded images arrive as a UINT8 tensor (one row of bytes per image), not TYPE_STRING.

A bad request (bytes that are not an image, NaN or Inf values) gets an error response naming
the problem; the other requests of the same batch are still answered.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import numpy as np


class _Capsule:
    """numpy.from_dlpack wants an object with __dlpack__; the stub hands out a bare capsule."""

    def __init__(self, capsule: Any) -> None:
        self.capsule = capsule

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU


class _Exporter:
    """The stub calls __dlpack__() without the keywords NumPy 2 uses: give it a legacy capsule,
    and keep it, so that it outlives the stub's call (see `to_tensor`)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.ascontiguousarray(array)
        self.capsule: Any = None

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        self.capsule = self.array.__dlpack__()
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)


# The DLPack convention: a consumer renames the capsule it took to "used_dltensor", and the
# producer's capsule destructor then leaves the tensor alone. The stub renames it "used_dlpack"
# instead (it does call the tensor's deleter itself), so NumPy's destructor took the capsule
# for an unconsumed one, failed to read it under the old name and logged "PyCapsule_GetPointer
# called with incorrect name" on every response. The capsule is renamed to the conventional name
# before it is released. The name must outlive the capsule: a module-level buffer.
_USED_NAME = ctypes.create_string_buffer(b"used_dltensor")
_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.argtypes, _capsule_name.restype = [ctypes.py_object], ctypes.c_char_p
_capsule_rename = ctypes.pythonapi.PyCapsule_SetName
_capsule_rename.argtypes, _capsule_rename.restype = [ctypes.py_object, ctypes.c_void_p], ctypes.c_int


def to_numpy(tensor: Any) -> np.ndarray:
    return np.array(np.from_dlpack(_Capsule(tensor.to_dlpack())), copy=True)


def to_tensor(pb_utils: Any, name: str, array: np.ndarray) -> Any:
    exporter = _Exporter(array)
    tensor = pb_utils.Tensor.from_dlpack(name, exporter)
    if exporter.capsule is not None and _capsule_name(exporter.capsule) == b"used_dlpack":
        _capsule_rename(exporter.capsule, ctypes.addressof(_USED_NAME))
    return tensor


def _parameters(args: dict[str, Any]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _artifacts(args: dict[str, Any]) -> Path:
    return Path(args["model_repository"]) / str(args["model_version"]) / "artifacts"


class Classifier:
    """The project's ORT or OpenVINO runner on the artifact folder copied into the version folder."""

    def initialize(self, args: dict[str, Any]) -> None:
        from cvt_export.backends import get_backend

        params = _parameters(args)
        threads = int(params["threads"]) if params.get("threads") else None
        backend = get_backend(params["backend"])
        # a batch of any size may come from Triton's scheduler: OpenVINO serves them all from one
        # model rather than stall a request for a compile (about 0.6 s) on each new size
        shapes = {"shapes": "dynamic"} if backend.name == "openvino" else {}
        self.runner = backend.compile(_artifacts(args), params["precision"], threads=threads,
                                      **shapes)  # type: ignore[arg-type]
        self.runner.activate()  # type: ignore[attr-defined]
        self.input_name = params.get("input", "pixel_values")
        self.output_name = params.get("output", "logits")

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        from cvt_export.backends import BackendError

        arrays: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for request in requests:
            x = to_numpy(pb_utils.get_input_tensor_by_name(request, self.input_name))
            try:
                arrays.append(self.runner.check_input(x))  # type: ignore[attr-defined]
                errors.append(None)
            except BackendError as e:
                arrays.append(None)
                errors.append(str(e))
        good = [a for a in arrays if a is not None]
        logits = self.runner(np.concatenate(good)) if good else np.zeros((0, 1), np.float32)
        responses, start = [], 0
        for array, error in zip(arrays, errors, strict=True):
            if array is None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)))
                continue
            rows = logits[start:start + len(array)]
            start += len(array)
            responses.append(pb_utils.InferenceResponse([to_tensor(pb_utils, self.output_name, rows)]))
        return responses

    def finalize(self) -> None:
        self.runner.deactivate()  # type: ignore[attr-defined]


class Preprocess:
    """Encoded image bytes (UINT8 rows) -> the variant's exact preprocessing (cvt_ref's own)."""

    def initialize(self, args: dict[str, Any]) -> None:
        from cvt_export.artifacts import ArtifactFolder

        self.variant = ArtifactFolder.open(_artifacts(args)).variant

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        import cvt_ref
        from cvt_ref.preprocess import decode_image, preprocess_array

        responses = []
        for request in requests:
            rows = to_numpy(pb_utils.get_input_tensor_by_name(request, "image"))
            try:
                pixels = np.stack([preprocess_array(decode_image(row.tobytes(), "request image"),
                                                    self.variant) for row in rows.reshape(len(rows), -1)])
            except cvt_ref.ImageError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
                continue
            responses.append(pb_utils.InferenceResponse([to_tensor(pb_utils, "pixel_values", pixels)]))
        return responses
