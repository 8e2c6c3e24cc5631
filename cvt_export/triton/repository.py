"""An artifact folder -> a Triton model repository, every config checked before it is kept.

Configs are built as Triton's own `ModelConfig` protobuf (from `tritonclient`), written as
text, then parsed back and checked against the model file they describe (IO names, dims,
dtypes, batch limits). The repository is made in a staging folder and renamed into place, with
`cvt-repository.json` (the manifest's source, the sha256 of every model file, the artifact's
fidelity figures) written last.

Runtimes:
- `python`: the project's ORT or OpenVINO runner inside Triton's Python backend (what runs on a
  CPU-only machine with PyPI's tritonserver); the artifact folder's needed files are copied into
  the version folder, and the model code is imported from `cvt_export.triton.python_model`.
- `onnxruntime`: `platform: "onnxruntime_onnx"`, the precision's ONNX file (optionally with
  the TensorRT or CUDA execution accelerator for GPU instances).
- `openvino`: `backend: "openvino"`, the IR this project makes (`cvt-export openvino`).
- `tensorrt`: `platform: "tensorrt_plan"`, the engine from `cvt-export trt`, batch limits from its
  optimization profile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cvt_export import artifacts, precisions
from cvt_export.artifacts import ArtifactFolder
from cvt_export.records import EngineRecord, RepositoryRecord, as_json, read_sidecar
from cvt_export.runtime import INPUT_NAME, OUTPUT_NAME
from cvt_export.triton import TritonError
from cvt_ref.source import sha256_file

Runtime = Literal["python", "onnxruntime", "openvino", "tensorrt"]
RUNTIMES: tuple[Runtime, ...] = ("python", "onnxruntime", "openvino", "tensorrt")
RECORD = "cvt-repository.json"
ENGINE_RECORD = "model.plan.json"  # a TensorRT engine's sidecar (records.EngineRecord), beside the plan
RECORD_FILES = "files"
IMAGE_INPUT = "image"
LABELS_FILE = "labels.txt"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
MAX_INSTANCES = 64
MAX_THREADS = 256
# What each native runtime runs, from the one precision table (the native OpenVINO backend gets no
# inference-precision hint from us: a precision without a file of its own, such as bf16, is the
# python runtime's only).
NATIVE = {"onnxruntime": precisions.run_by("ort"),
          "openvino": tuple(p for p in precisions.run_by("openvino") if precisions.get(p).file),
          "tensorrt": precisions.run_by("tensorrt")}


@dataclass(frozen=True)
class RepoOptions:
    name: str = "cvt"
    precision: str = "fp32"
    runtime: Runtime = "python"
    python_backend: str = "ort"        # the runner the python runtime uses: ort | openvino
    max_batch: int = 32
    preferred_batch: tuple[int, ...] = (4, 8, 16)
    queue_delay_us: int = 2000
    instances: int = 1
    gpu: bool = False                  # KIND_GPU instances (native runtimes on a GPU host)
    accelerator: str | None = None     # onnxruntime on GPU: "tensorrt" or "cuda"
    threads: int | None = None
    preprocess: bool = False
    labels: bool = False

    def check(self) -> None:
        if self.runtime not in RUNTIMES:
            raise TritonError(f"--runtime {self.runtime!r}: use {', '.join(RUNTIMES)}")
        if not NAME.fullmatch(self.name) or self.name.endswith("."):
            raise TritonError(f"--name {self.name!r}: letters, digits, '_', '-' and '.', starting with a "
                              "letter or digit (it is a folder name and a URL path segment)")
        if not 1 <= self.max_batch <= 4096:
            raise TritonError(f"--max-batch {self.max_batch}: use 1..4096")
        if not 1 <= self.instances <= MAX_INSTANCES:
            raise TritonError(f"--instances {self.instances}: use 1..{MAX_INSTANCES} (each instance holds "
                              "its own copy of the model)")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise TritonError(f"--threads {self.threads}: use 1..{MAX_THREADS}")
        if not 0 <= self.queue_delay_us <= 10_000_000:
            raise TritonError(f"queue delay {self.queue_delay_us} us: use 0..10000000")
        if any(b < 1 for b in self.preferred_batch):  # those above max_batch are left out when written
            raise TritonError(f"preferred batch sizes {list(self.preferred_batch)}: each 1 or more")
        if self.python_backend not in ("ort", "openvino"):
            raise TritonError(f"python runtime backend {self.python_backend!r}: use ort or openvino")
        if self.accelerator not in (None, "tensorrt", "cuda"):
            raise TritonError(f"--accelerator {self.accelerator!r}: use tensorrt or cuda")
        # Flags a runtime would silently ignore are refused: what is written is what runs.
        if self.runtime != "python" and (self.threads is not None or self.python_backend != "ort"):
            raise TritonError(f"--threads and --python-backend apply to the python runtime only, not "
                              f"{self.runtime}")
        if self.runtime == "python" and self.gpu:
            raise TritonError("--gpu: the python runtime runs this project's CPU runners; use --runtime "
                              "onnxruntime, openvino or tensorrt for GPU instances")
        if self.accelerator and (self.runtime != "onnxruntime" or not self.gpu):
            raise TritonError("--accelerator applies to --runtime onnxruntime with --gpu only")
        if self.runtime in NATIVE and self.precision not in NATIVE[self.runtime]:
            raise TritonError(f"--precision {self.precision}: the {self.runtime} runtime serves "
                              f"{', '.join(NATIVE[self.runtime])}")
        if self.runtime == "python":
            from cvt_export.backends import get_backend

            runs = get_backend(self.python_backend).precisions
            if self.precision not in runs:
                raise TritonError(f"--precision {self.precision}: the python runtime's {self.python_backend} "
                                  f"runner runs {', '.join(runs)}")


def check_labels(labels: list[str], classes: int) -> None:
    """labels.txt holds one label per line, line k naming class k."""
    if len(labels) != classes:
        raise TritonError(f"--labels: the folder names {len(labels)} labels for {classes} classes")
    for k, label in enumerate(labels):
        if not label.strip() or any(c in label for c in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):
            raise TritonError(f"--labels: class {k}'s label {label!r} is empty or holds a line break "
                              "(labels.txt is one label per line); fix the labels or leave out --labels")


def _pb() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise TritonError("tritonclient is not installed: pip install 'cvt-export[triton]'") from None
    return model_config_pb2


def _text(config: Any) -> str:
    from google.protobuf import text_format

    return str(text_format.MessageToString(config))


def parse_config(path: Path) -> Any:
    """A config.pbtxt parsed by Triton's schema: a misspelt field or a wrong type is refused."""
    from google.protobuf import text_format

    config = _pb().ModelConfig()
    try:
        text_format.Parse(path.read_text(), config)
    except (text_format.ParseError, OSError) as e:
        raise TritonError(f"{path}: not a valid Triton ModelConfig ({e})") from None
    return config


def _io(pb: Any, message: Any, name: str, dims: list[int], dtype: str = "TYPE_FP32") -> Any:
    io = message(name=name, data_type=getattr(pb, dtype))
    io.dims.extend(dims)
    return io


def _scheduling(pb: Any, config: Any, opts: RepoOptions) -> None:
    config.dynamic_batching.preferred_batch_size.extend(
        b for b in opts.preferred_batch if b <= opts.max_batch)
    config.dynamic_batching.max_queue_delay_microseconds = opts.queue_delay_us
    group = config.instance_group.add()
    group.count = opts.instances
    group.kind = pb.ModelInstanceGroup.KIND_GPU if opts.gpu else pb.ModelInstanceGroup.KIND_CPU


def _warmup(pb: Any, config: Any, size: int, data_file: str | None) -> None:
    """One real input at batch 1 (a bundled photo's pixels) before the model takes traffic."""
    warm = config.model_warmup.add(name="photo", batch_size=1)
    item = warm.inputs[INPUT_NAME]
    item.data_type = pb.TYPE_FP32
    item.dims.extend([3, size, size])
    if data_file:
        item.input_data_file = data_file
    else:
        item.random_data = True


def classifier_config(name: str, opts: RepoOptions, size: int, classes: int, *, labels: bool,
                      warmup_file: str | None) -> Any:
    pb = _pb()
    config = pb.ModelConfig(name=name, max_batch_size=opts.max_batch)
    if opts.runtime == "python":
        config.backend = "python"
        for key, value in (("backend", opts.python_backend), ("precision", opts.precision),
                           ("threads", str(opts.threads or ""))):
            config.parameters[key].string_value = value
    elif opts.runtime == "onnxruntime":
        config.platform = "onnxruntime_onnx"
        if opts.accelerator:
            acc = config.optimization.execution_accelerators.gpu_execution_accelerator.add()
            acc.name = opts.accelerator
            if opts.accelerator == "tensorrt" and precisions.get(opts.precision).dtype == "float16":
                acc.parameters["precision_mode"] = "FP16"
    elif opts.runtime == "openvino":
        config.backend = "openvino"
    else:
        config.platform = "tensorrt_plan"
    config.input.append(_io(pb, pb.ModelInput, INPUT_NAME, [3, size, size]))
    output = _io(pb, pb.ModelOutput, OUTPUT_NAME, [classes])
    if labels:
        output.label_filename = LABELS_FILE
    config.output.append(output)
    _scheduling(pb, config, opts)
    _warmup(pb, config, size, warmup_file)
    return config


def preprocess_config(name: str, opts: RepoOptions, size: int) -> Any:
    pb = _pb()
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=opts.max_batch)
    config.input.append(_io(pb, pb.ModelInput, IMAGE_INPUT, [-1], "TYPE_UINT8"))
    config.output.append(_io(pb, pb.ModelOutput, INPUT_NAME, [3, size, size]))
    group = config.instance_group.add()
    group.count = opts.instances
    group.kind = pb.ModelInstanceGroup.KIND_CPU
    return config


def ensemble_config(name: str, opts: RepoOptions, classes: int, classifier: str, pre: str) -> Any:
    pb = _pb()
    config = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=opts.max_batch)
    config.input.append(_io(pb, pb.ModelInput, IMAGE_INPUT, [-1], "TYPE_UINT8"))
    output = _io(pb, pb.ModelOutput, OUTPUT_NAME, [classes])
    if opts.labels:
        output.label_filename = LABELS_FILE
    config.output.append(output)
    first = config.ensemble_scheduling.step.add(model_name=pre, model_version=-1)
    first.input_map[IMAGE_INPUT] = IMAGE_INPUT
    first.output_map[INPUT_NAME] = "pixels"
    second = config.ensemble_scheduling.step.add(model_name=classifier, model_version=-1)
    second.input_map[INPUT_NAME] = "pixels"
    second.output_map[OUTPUT_NAME] = OUTPUT_NAME
    return config


def python_path() -> list[str]:
    """Where this environment's packages are: Triton's Python stub ignores PYTHONPATH."""
    import cvt_export

    project = str(Path(cvt_export.__file__).resolve().parents[1])
    return [project, *site.getsitepackages()]


def _model_py(cls: str) -> str:
    paths = os.pathsep.join(python_path())
    return (
        '"""Generated by cvt-export: the project\'s own code runs here (cvt_export.triton.python_model).\n\n'
        "Triton's Python stub ignores PYTHONPATH; CVT_EXPORT_PYTHONPATH (else the environment that\n"
        'generated this repository) says where cvt_export and its dependencies are installed."""\n'
        "import os\nimport sys\n\n"
        f"_PATHS = os.environ.get(\"CVT_EXPORT_PYTHONPATH\") or {paths!r}\n"
        "for _p in reversed([p for p in _PATHS.split(os.pathsep) if p]):\n"
        "    if _p not in sys.path:\n"
        "        sys.path.insert(0, _p)\n\n"
        f"from cvt_export.triton.python_model import {cls} as TritonPythonModel  # noqa: E402\n\n"
        '__all__ = ["TritonPythonModel"]\n')


def _warmup_data(variant: Any, dst: Path) -> str:
    """A bundled photo's preprocessed pixels, raw float32, for Triton's model warm-up."""
    from cvt_ref.preprocess import bundled_photos, preprocess_array

    data = preprocess_array(bundled_photos()[0], variant).astype("<f4")
    (dst / "warmup").mkdir(exist_ok=True)
    (dst / "warmup" / "pixels.f32").write_bytes(data.tobytes())
    return "pixels.f32"


def model_names(opts: RepoOptions) -> list[str]:
    """The repository folders `opts.name` owns: the classifier, and with --preprocess its step
    and the ensemble."""
    if not opts.preprocess:
        return [opts.name]
    return [f"{opts.name}-classifier", f"{opts.name}-preprocess", opts.name]


def _record_files(out: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """Every `NAME.cvt-repository.json` in a repository, parsed (None: unreadable or not an object)."""
    found: list[tuple[Path, dict[str, Any] | None]] = []
    for path in sorted(out.glob(f"*.{RECORD}")) if out.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        found.append((path, data if isinstance(data, dict) else None))
    return found


def records(out: Path) -> dict[str, list[str]]:
    """Record name -> the model folders it says it wrote (plain names only; a malformed record
    owns nothing, so what it names is never replaced)."""
    found: dict[str, list[str]] = {}
    for path, data in _record_files(out):
        models = data.get("models") if data is not None else None
        if isinstance(models, list) and all(isinstance(m, str) and NAME.fullmatch(m) for m in models):
            found[path.name.removesuffix(f".{RECORD}")] = list(models)
    return found


def check_destination(folder: ArtifactFolder, out: Path, opts: RepoOptions) -> list[str]:
    """Refuse, before anything changes, a repository that would overwrite an artifact folder or
    anything this tool did not write; returns the model folders the write replaces."""
    art = folder.path.resolve()
    if out.exists() and not out.is_dir():
        raise TritonError(f"--out {out}: is a file, not a folder")
    top = out.resolve()
    for above in (top, *top.parents):
        if above == art or ArtifactFolder.is_export(above):
            raise TritonError(f"--out {out}: is an artifact folder or inside one ({above}); "
                              "write the repository to a folder of its own")
    owned = records(out)
    replaced = []
    for name in model_names(opts):
        target = out / name
        if not target.exists() and not target.is_symlink():
            continue
        real = target.resolve()
        if target.is_symlink() or ArtifactFolder.is_export(target) or real == art or real in art.parents:
            raise TritonError(f"--name {opts.name}: {target} is an artifact folder, holds one, or is a "
                              "link; choose another --name or --out")
        holders = [r for r, models in owned.items() if name in models]
        if not holders:
            raise TritonError(f"--name {opts.name}: {target} exists and was not written by `cvt-export "
                              "triton`; choose another --name or --out (nothing was changed)")
        others = [r for r in holders if r != opts.name]
        if others:
            raise TritonError(f"--name {opts.name}: {target} belongs to model {others[0]!r} "
                              f"({others[0]}.{RECORD}); replacing it would leave that record stale")
        replaced.append(name)
    return replaced


def write_repository(folder: ArtifactFolder | Path, out: Path, opts: RepoOptions, *,
                     held: bool = False) -> RepositoryRecord:
    """Write (replace) the models of `opts.name` in the repository `out`; returns the record
    (`replaced`: the model folders of an earlier write of the same name that it replaced).
    Under the repository's writer lock, taken here unless the caller holds it (`held`)."""
    opts.check()
    folder = artifacts.as_folder(folder)
    onnx_path = folder.onnx(opts.precision)  # verified against the manifest
    if opts.labels:
        check_labels(folder.labels, folder.variant.num_classes)
    check_destination(folder, out, opts)  # refused before anything changes
    if held:
        return _write_locked(folder, out, opts, onnx_path)
    with artifacts.writer(out, "--out"):
        return _write_locked(folder, out, opts, onnx_path)


def _write_locked(folder: ArtifactFolder, out: Path, opts: RepoOptions, onnx_path: Path) -> RepositoryRecord:
    variant = folder.variant
    labels = folder.labels
    size, classes = variant.image_size, variant.num_classes
    replaced = check_destination(folder, out, opts)  # again, now that no other writer can change it
    classifier = model_names(opts)[0]
    with artifacts.staging(out) as staged:  # under the lock: what a killed writer staged goes first
        files: dict[str, str] = {}
        version = staged / classifier / "1"
        version.mkdir(parents=True)
        warm = _warmup_data(variant, staged / classifier)
        model_file = _write_model(folder, opts, version)
        config = classifier_config(classifier, opts, size, classes,
                                   labels=opts.labels and not opts.preprocess, warmup_file=warm)
        if model_file:
            config.default_model_filename = model_file
        (staged / classifier / "config.pbtxt").write_text(_text(config))
        if opts.labels and not opts.preprocess:  # with an ensemble, the label file is on its output
            (staged / classifier / LABELS_FILE).write_text("\n".join(labels) + "\n")
        names = [classifier]
        if opts.preprocess:
            pre = f"{opts.name}-preprocess"
            (staged / pre / "1").mkdir(parents=True)
            (staged / pre / "1" / "model.py").write_text(_model_py("Preprocess"))
            folder.copy_to(staged / pre / "1" / "artifacts", ())
            (staged / pre / "config.pbtxt").write_text(_text(preprocess_config(pre, opts, size)))
            (staged / opts.name / "1").mkdir(parents=True)  # an ensemble's version folder is empty
            (staged / opts.name / "config.pbtxt").write_text(
                _text(ensemble_config(opts.name, opts, classes, classifier, pre)))
            if opts.labels:
                (staged / opts.name / LABELS_FILE).write_text("\n".join(labels) + "\n")
            names += [pre, opts.name]
        for path in sorted(staged.rglob("*")):
            if path.is_file() and path.parent != staged:  # the models' files, not the staging mark
                files[str(path.relative_to(staged))] = sha256_file(path)
        validate_repository(staged, names)
        record = RepositoryRecord(name=opts.name, models=tuple(names), options=asdict(opts),
                                  source=folder.source, artifact=str(folder.path), onnx=onnx_path.name,
                                  onnx_sha256=folder.sha256(opts.precision),
                                  fidelity=folder.entry(opts.precision).validation, files=files,
                                  replaced=tuple(replaced))
        for name in names:  # an earlier write of this name (checked above) moves out, then is removed
            if (out / name).exists():
                os.replace(out / name, staged / f".old-{name}")
            os.replace(staged / name, out / name)
        artifacts.atomic_write(out / f"{opts.name}.{RECORD}", json.dumps(as_json(record), indent=2) + "\n")
        return record


def _write_model(folder: ArtifactFolder, opts: RepoOptions, version: Path) -> str | None:
    """The runtime's model file(s) in the version folder; returns a non-default file name."""
    if opts.runtime == "python":
        (version / "model.py").write_text(_model_py("Classifier"))
        kept: tuple[str, ...] = (precisions.reads(opts.precision),)
        if opts.python_backend == "openvino":  # and the file its IR is converted from
            from cvt_export.backends import openvino as ov

            kept = tuple(dict.fromkeys((*kept, ov.source_precision(opts.precision))))
        copy = folder.copy_to(version / "artifacts", kept)
        if opts.python_backend == "openvino" and ov.BACKEND.available()[0]:
            ov.ir_file(copy, opts.precision)  # made now: instances loading at once never race for it
        return None
    if opts.runtime == "onnxruntime":
        for f in folder.file_names(opts.precision):
            shutil.copy2(folder.file(f), version / ("model.onnx" if f.endswith(".onnx") else f))
        return None
    if opts.runtime == "openvino":
        from cvt_export.backends import openvino as ov

        ir = ov.ir_file(folder, opts.precision)
        shutil.copy2(ir, version / "model.xml")
        shutil.copy2(ir.with_suffix(".bin"), version / "model.bin")
        return None
    from cvt_export.backends import tensorrt as trt

    path, _, meta = trt.engine_file(folder, opts.precision, trt.BuildOptions.up_to(opts.max_batch))
    shutil.copy2(path, version / "model.plan")
    (version / ENGINE_RECORD).write_text(json.dumps(as_json(meta), indent=2) + "\n")
    return None


_NUMPY = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_UINT8": "uint8", "TYPE_INT64": "int64"}


def _declared(config: Any, pb: Any) -> dict[str, tuple[str, list[int]]]:
    return {io.name: (pb.DataType.Name(io.data_type), list(io.dims))
            for io in [*config.input, *config.output]}


def validate_repository(repo: Path, names: list[str]) -> None:
    """Each model's config parses under Triton's schema and agrees with its model file."""
    pb = _pb()
    for name in names:
        path = repo / name / "config.pbtxt"
        config = parse_config(path)
        if config.name != name:
            raise TritonError(f"{path}: name {config.name!r} is not its folder's {name!r}")
        declared = _declared(config, pb)
        for io in [*config.output]:
            if io.label_filename and not (repo / name / io.label_filename).is_file():
                raise TritonError(f"{path}: label file {io.label_filename} is missing")
        version = repo / name / "1"
        if config.platform == "onnxruntime_onnx":
            _check_onnx(path, version / "model.onnx", declared, config.max_batch_size)
        elif config.backend == "python" and (version / "artifacts").is_dir():
            carried = ArtifactFolder.open(version / "artifacts")
            for prec in precisions.FILES:
                if carried.has(prec):
                    _check_onnx(path, carried.onnx(prec), declared, config.max_batch_size)
        elif config.backend == "openvino":
            _check_ir(path, version / "model.xml", declared)
        elif config.platform == "tensorrt_plan":
            meta = read_sidecar(EngineRecord, version / ENGINE_RECORD)
            if meta is None:
                raise TritonError(f"{path}: {version / ENGINE_RECORD} is missing or not an engine's record; "
                                  "write the repository again")
            if config.max_batch_size > meta.build.max_batch:
                raise TritonError(f"{path}: max_batch_size {config.max_batch_size} exceeds the engine "
                                  f"profile's {meta.build.max_batch}")
        elif config.platform == "ensemble":
            steps = [s.model_name for s in config.ensemble_scheduling.step]
            missing = [s for s in steps if not (repo / s / "config.pbtxt").is_file()]
            if missing:
                raise TritonError(f"{path}: ensemble step models missing: {', '.join(missing)}")


def _check_onnx(config_path: Path, model: Path, declared: dict[str, tuple[str, list[int]]],
                max_batch: int) -> None:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.name not in declared:
            raise TritonError(f"{config_path}: declares no {value.name!r}, which {model.name} has")
        dtype, dims = declared[value.name]
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        if _NUMPY.get(dtype) != np_dtype:
            raise TritonError(f"{config_path}: {value.name} is {dtype}, the model file has {np_dtype}")
        shape = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        batch, rest = shape[0], shape[1:]
        if rest != dims:
            raise TritonError(f"{config_path}: {value.name} dims {dims}, the model file has {rest}")
        if isinstance(batch, int) and batch and max_batch > batch:
            raise TritonError(f"{config_path}: max_batch_size {max_batch} but {model.name} has a fixed "
                              f"batch of {batch}")


def _check_ir(config_path: Path, model: Path, declared: dict[str, tuple[str, list[int]]]) -> None:
    try:
        import openvino as ov
    except ImportError:
        return  # the schema check stands; the IR is checked where OpenVINO is installed
    ir = ov.Core().read_model(str(model))
    for port in [*ir.inputs, *ir.outputs]:
        names = port.get_names() & set(declared)
        if not names:
            raise TritonError(f"{config_path}: the IR's {port.get_any_name()!r} is not declared")
        dims = declared[next(iter(names))][1]
        shape = port.get_partial_shape()
        rest = [d.get_length() if d.is_static else -1 for d in list(shape)[1:]]
        if rest != dims:
            raise TritonError(f"{config_path}: {next(iter(names))} dims {dims}, the IR has {rest}")


def _python_parameters(config: Any, path: Path) -> None:
    """A python-runtime config's parameters as Classifier reads them (an edited config is caught
    here, not as an error inside a Triton stub)."""
    params = {k: v.string_value for k, v in config.parameters.items()}
    if params.get("backend", "ort") not in ("ort", "openvino"):
        raise TritonError(f"{path}: parameter backend {params['backend']!r}: use ort or openvino")
    threads = params.get("threads", "")
    if threads and (not threads.isdigit() or not 1 <= int(threads) <= MAX_THREADS):
        raise TritonError(f"{path}: parameter threads {threads!r}: use 1..{MAX_THREADS} or leave it empty")
    if "precision" in params and params["precision"] not in precisions.NAMES:
        raise TritonError(f"{path}: parameter precision {params['precision']!r}: use "
                          f"{', '.join(precisions.NAMES)}")


def _recorded_files(repo: Path) -> dict[str, str]:
    """model-relative file -> sha256, from every record in the repository (paths that leave the
    repository or are not plain are refused)."""
    files: dict[str, str] = {}
    for record, data in _record_files(repo):
        listed = data.get(RECORD_FILES) if data is not None else None  # the record's, not a manifest's
        if not isinstance(listed, dict):
            raise TritonError(f"{record}: not a record written by `cvt-export triton`; write the "
                              "repository again")
        for rel, digest in listed.items():
            parts = Path(str(rel)).parts
            if not parts or Path(str(rel)).is_absolute() or ".." in parts or not isinstance(digest, str):
                raise TritonError(f"{record}: lists {rel!r}, which is not a file inside the repository")
            files[str(rel)] = digest
    return files


def check_served(repo: Path) -> list[str]:
    """Before tritonserver starts: the repository holds models, each a folder with a name Triton
    accepts, a config valid under Triton's schema that agrees with its model file, and files as
    `cvt-export triton` wrote them. The first problem is raised naming the model and the cause;
    returns the model names."""
    if not repo.is_dir():
        raise TritonError(f"{repo}: no such model repository")
    folders = sorted(p for p in repo.iterdir() if p.is_dir())
    if not folders:
        raise TritonError(f"{repo}: holds no models (write one with `cvt-export triton --out {repo}`)")
    for folder in folders:
        if not NAME.fullmatch(folder.name) or folder.name.endswith("."):
            raise TritonError(f"{repo}: folder {folder.name!r} is not a model name Triton serves (letters, "
                              "digits, '_', '-', '.'); move it out of the repository")
        if not (folder / "config.pbtxt").is_file():
            raise TritonError(f"model {folder.name!r}: no config.pbtxt in {folder}")
    names = [f.name for f in folders]
    for name in names:  # configs first: an edited config is named as such, not as a changed file
        path = repo / name / "config.pbtxt"
        try:
            config = parse_config(path)
            if config.backend == "python" and config.platform != "ensemble":
                _python_parameters(config, path)
        except TritonError as e:
            raise TritonError(f"model {name!r}: {e}") from None
    for rel, digest in _recorded_files(repo).items():
        path = repo / rel
        model = Path(rel).parts[0]
        if not path.is_file() or path.is_symlink():
            raise TritonError(f"model {model!r}: {rel} is missing; write the repository again")
        if sha256_file(path) != digest:
            raise TritonError(f"model {model!r}: {rel} is not the file `cvt-export triton` wrote (sha256 "
                              "differs: truncated or edited); write the repository again")
    for name in names:
        try:
            validate_repository(repo, [name])
        except TritonError as e:
            raise TritonError(f"model {name!r}: {e}") from None
        except Exception as e:  # a model file that does not parse (onnx, IR, JSON)
            raise TritonError(f"model {name!r}: its model file does not load ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
    return names
