"""Where weights come from, and how their keys map onto `cvt_ref.model.CvT`.

Accepted sources (`create_model(variant, weights)`):
- `random` / `random:SEED`: deterministic, non-degenerate weights for tests and benchmarks;
- a transformers folder (`config.json` + `model.safetensors` or `pytorch_model.bin`);
- a bare `.safetensors` / `.bin` / `.pt` / `.pth` file in transformers, original or native keys;
- a hub id such as `microsoft/cvt-13`, through huggingface_hub (cached, offline-aware).

Loading is strict: missing, unexpected or mis-shaped keys are one `WeightsError` that lists
them and names the variant the weights would fit. Pickles load with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from cvt_ref.errors import WeightsError, first_line
from cvt_ref.model import CvT, Stage
from cvt_ref.source import Activation, WeightsSource, sha256_file
from cvt_ref.variants import Variant, variants_with_architecture

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_TIMEOUT_S = 10.0
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SHARD_FILES = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")
StateDict = dict[str, torch.Tensor]


# --- key maps: checkpoint key -> our key -------------------------------------------------

_HF_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    (r"^cvt\.encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.projection\.",
     r"stages.\1.embed.proj."),
    (r"^cvt\.encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.normalization\.",
     r"stages.\1.embed.norm."),
    (r"^cvt\.encoder\.stages\.(\d+)\.cls_token$", r"stages.\1.cls_token"),
    (r"^cvt\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.attention\.attention\.convolution_projection_([qkv])(?:uery|ey|alue)\.convolution_projection\.",
     r".attn.conv_proj_\1."),
    (r"\.(conv_proj_[qkv])\.convolution\.", r".\1.conv."),
    (r"\.(conv_proj_[qkv])\.normalization\.", r".\1.bn."),
    (r"\.attention\.attention\.projection_([qkv])(?:uery|ey|alue)\.", r".attn.proj_\1."),
    (r"\.attention\.output\.dense\.", r".attn.proj."),
    (r"\.intermediate\.dense\.", r".mlp.fc1."),
    (r"\.output\.dense\.", r".mlp.fc2."),
    (r"\.layernorm_before\.", r".norm1."),
    (r"\.layernorm_after\.", r".norm2."),
    (r"^layernorm\.", r"norm."),
    (r"^classifier\.", r"head."),
]]

_ORIGINAL_RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(p), r) for p, r in [
    (r"^stage(\d+)\.patch_embed\.", r"stages.\1.embed."),
    (r"^stage(\d+)\.", r"stages.\1."),
]]


def _rename(state: StateDict, rules: list[tuple[re.Pattern[str], str]]) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def to_native_keys(state: Mapping[str, object], where: str) -> tuple[StateDict, str]:
    """Recognise the checkpoint's key style and rename to ours; returns (state, kind)."""
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{where}: holds no tensors; is it a CvT checkpoint?")
    keys = list(tensors)
    if any(k.startswith("cvt.encoder.") for k in keys):
        return _rename(tensors, _HF_RULES), "transformers"
    if any(re.match(r"stage\d+\.", k) for k in keys):
        return _rename(tensors, _ORIGINAL_RULES), "original"
    if any(k.startswith("stages.") for k in keys):
        return tensors, "native"
    raise WeightsError(f"{where}: keys look like no CvT checkpoint (first: {', '.join(keys[:3])})")


# --- reading files -------------------------------------------------------------------------

def _unwrap(obj: object, where: str) -> Mapping[str, object]:
    """Training scripts wrap state dicts as {'state_dict': ...} or {'model': ...}."""
    if isinstance(obj, Mapping):
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model", "model_state", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return _unwrap(inner, where)
    raise WeightsError(f"{where}: not a state dict (found {type(obj).__name__})")


SAFETENSORS_MAGIC_MAX = 100_000_000  # a safetensors header length above this is not one


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with a little-endian u64 header length and a JSON object."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return (len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= SAFETENSORS_MAGIC_MAX
            and head[8:9] == b"{")


def _read_safetensors(path: Path) -> Mapping[str, object]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def read_state_dict(path: Path) -> Mapping[str, object]:
    where = str(path)
    if not path.exists():
        raise WeightsError(f"{where}: no such file or folder")
    if path.is_dir():
        raise WeightsError(f"{where}: a folder, not a weights file")
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    if path.suffix == ".safetensors" or _is_safetensors(path):  # the content decides, not the name
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": noise for the user here
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "weights only load failed" in text.lower():
            culprit = re.search(r"Unsupported (?:global|operand)[^\n.]*", text)
            raise WeightsError(
                f"{where}: refused, unpickling it would run arbitrary code "
                f"({culprit.group(0) if culprit else 'not plain tensors'}); torch.load with "
                "weights_only=True reads tensors only. Re-save it as safetensors where you "
                "trust its origin") from None
        raise WeightsError(f"{where}: not a readable PyTorch checkpoint ({first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise WeightsError(f"{where}: not a readable PyTorch checkpoint ({first_line(e)})") from None
    return _unwrap(obj, where)




def _weights_sha256(path: Path) -> str:
    """The file's sha256; for a shard index, one digest over the index and every shard it lists."""
    if not path.name.endswith(".index.json"):
        return sha256_file(path)
    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    joined = "\n".join([sha256_file(path), *(sha256_file(path.parent / s) for s in shards)])
    return hashlib.sha256(joined.encode()).hexdigest()


def _read_sharded(index: Path) -> Mapping[str, object]:
    """A sharded transformers save: an index mapping each tensor to one of several files."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{index}: not a readable shard index ({type(e).__name__}: {e})") from None
    state: dict[str, object] = {}
    for name in shards:
        shard = index.parent / name
        if not shard.is_file():
            raise WeightsError(f"{index}: lists {name}, which is not in {index.parent}")
        part = read_state_dict(shard)
        state.update(part)
    missing = [k for k in weight_map if k not in state]
    if missing:
        raise WeightsError(f"{index}: {len(missing)} tensors listed but not in the shards "
                           f"(first: {', '.join(missing[:3])})")
    return state


def _read_hf_config(folder: Path) -> dict[str, object]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: unreadable config ({e})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: config is not a JSON object")
    if config.get("model_type") not in (None, "cvt"):
        raise WeightsError(f"{folder}: model_type is {config.get('model_type')!r}, not 'cvt'")
    return config


def check_hf_config(config: Mapping[str, object], variant: Variant, where: str) -> None:
    """A transformers config that disagrees with the variant is refused before loading."""
    expected = variant.hf_config()
    def norm(value: object) -> object:
        return list(value) if isinstance(value, (list, tuple)) else value

    # num_labels is left to the strict key check, which names the head's shape.
    diffs = [f"{k}={config[k]} (variant has {v})" for k, v in expected.items()
             if k in config and k != "num_labels" and norm(config[k]) != norm(v)]
    if diffs:
        def ints(key: str) -> tuple[int, ...]:
            value = config.get(key)
            return tuple(int(x) for x in value) if isinstance(value, (list, tuple)) else ()

        fits = variants_with_architecture(ints("embed_dim"), ints("depth"))
        hint = f"; it fits {', '.join(fits)}" if fits else ""
        raise WeightsError(f"{where}: config does not match {variant.name}: "
                           + "; ".join(diffs[:4]) + hint)


def _id2label(config: Mapping[str, object]) -> dict[int, str] | None:
    raw = config.get("id2label")
    if not isinstance(raw, Mapping):
        return None
    labels = {int(k): str(v) for k, v in raw.items()}
    # transformers writes LABEL_0... when no names were given: not worth keeping.
    return None if all(v == f"LABEL_{k}" for k, v in labels.items()) else labels


def _folder_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    for index in SHARD_INDEXES:
        if (folder / index).is_file():
            return folder / index
    raise WeightsError(f"{folder}: holds no {' or '.join(WEIGHT_FILES)}")


def download_from_hub(repo_id: str) -> Path:
    """Fetch (or reuse from the cache) config + weights; offline it fails at once."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a core dependency
        raise WeightsError("huggingface_hub is not installed; pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", *WEIGHT_FILES, *SHARD_INDEXES,
                                                                  *SHARD_FILES],
                                      etag_timeout=HUB_TIMEOUT_S))
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise WeightsError(
            f"{repo_id}: could not get it from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE is set and it is not cached)' if offline else ''}: "
            f"{type(e).__name__}: {first_line(e)}. Pass a local folder or file instead") from None


# --- random weights ------------------------------------------------------------------------

@torch.no_grad()
def init_random(model: CvT, seed: int) -> None:
    """Deterministic weights whose every term matters, unlike the training init.

    Truncated LeCun-normal matrices keep attention scores O(1) (not uniform), and norm/BN
    parameters and running statistics are randomised so that a wrong eps, a missed bias or
    a bad BatchNorm fold changes the logits measurably.
    """
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_((torch.randn(t.shape, generator=g) * std).clamp_(-2 * std, 2 * std) + mean)

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            normal(module.weight, 1.0 / math.sqrt(fan_in))
            if module.bias is not None:
                normal(module.bias, 0.02)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            normal(module.weight, 0.1, mean=1.0)
            normal(module.bias, 0.1)
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                normal(module.running_mean, 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
    for module in model.modules():
        if isinstance(module, Stage) and module.cls_token is not None:
            normal(module.cls_token, 0.02)


# --- strict loading ------------------------------------------------------------------------

def _architecture(state: StateDict) -> tuple[tuple[int, ...], tuple[int, ...], int | None]:
    dims, depths = [], []
    for i in range(3):
        proj = state.get(f"stages.{i}.embed.proj.weight")
        dims.append(int(proj.shape[0]) if proj is not None else -1)
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"stages\.{i}\.blocks\.(\d+)\.", k))}
        depths.append(max(blocks) + 1 if blocks else 0)
    head = state.get("head.weight")
    return tuple(dims), tuple(depths), int(head.shape[0]) if head is not None else None


def _listing(label: str, items: list[str], limit: int = 4) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {label}: {', '.join(items[:limit])}{more}"


def load_state_strict(model: CvT, state: StateDict, where: str) -> None:
    expected = model.state_dict()
    # num_batches_tracked only counts training steps; eval never reads it.
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshaped:
        problems = [_listing(label, items) for label, items in
                    (("missing", missing), ("unexpected", unexpected),
                     ("mis-shaped (checkpoint vs model)", misshaped)) if items]
        dims, depths, classes = _architecture(state)
        fits = variants_with_architecture(dims, depths, classes)
        if model.variant.name in fits or (dims, depths) == (model.variant.embed_dims, model.variant.depths):
            hint = "; the architecture is right, so the file is incomplete or not a plain CvT checkpoint"
        elif fits:
            hint = f"; these weights fit {', '.join(fits)}"
        else:
            hint = (f"; they fit no known variant (stage dims {list(dims)}, depths {list(depths)}, "
                    f"{classes} classes)")
        raise WeightsError(f"{where}: does not fit {model.variant.name}: "
                           + "; ".join(problems) + hint)
    floats = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(floats, strict=False)


def _config_classes(config: Mapping[str, object]) -> int | None:
    labels = config.get("id2label")
    n = config.get("num_labels", len(labels) if isinstance(labels, Mapping) else None)
    return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None


def looks_like_path(text: str) -> bool:
    """A spec that names a local file (a suffix, or ./ ../ / ~), not a hub id like microsoft/cvt-13."""
    return text.startswith((".", "/", "~")) or Path(text).suffix.lower() in (
        ".pth", ".pt", ".bin", ".safetensors", ".json", ".ckpt")


def resolve(spec: str | Path) -> tuple[Callable[[CvT], None], WeightsSource, Mapping[str, object] | None,
                                       int | None]:
    """Turn a weights spec into (loader, source, hf_config, num_classes) without building the model.

    num_classes is the checkpoint's own (its config's num_labels, else its head's rows); None
    for random weights, which take the variant's."""
    text = str(spec)
    if text == "random" or text.startswith("random:"):
        seed_text = text.partition(":")[2] or "0"
        if not seed_text.isdigit():
            raise WeightsError(f"{text!r}: the seed must be a non-negative integer (random:SEED)")
        seed = int(seed_text)
        return (lambda m: init_random(m, seed)), WeightsSource(text, "random", "gelu"), None, None

    path = Path(text).expanduser()
    if not path.exists() and HUB_ID.match(text) and not looks_like_path(text):
        path = download_from_hub(text)
    config: Mapping[str, object] | None = None
    if path.is_dir():
        if not (path / "config.json").exists():
            raise WeightsError(f"{path}: a folder without config.json; "
                               "expected a transformers save_pretrained folder")
        config = _read_hf_config(path)
        path = _folder_weights(path)
    elif not path.exists():
        hint = "" if looks_like_path(text) else " (and not a hub id like microsoft/cvt-13)"
        raise WeightsError(f"{text}: no such file or folder{hint}")

    state, kind = to_native_keys(read_state_dict(path), str(path))
    # The original code trains with QuickGELU; transformers' port uses exact GELU.
    activation: Activation = "quick_gelu" if kind == "original" else "gelu"
    source = WeightsSource(text, kind, activation, _weights_sha256(path), path,
                           _id2label(config) if config else None)
    head = state.get("head.weight")
    classes = _config_classes(config) if config else None
    if classes is None and head is not None and head.dim() == 2:
        classes = int(head.shape[0])
    return (lambda m: load_state_strict(m, state, str(path))), source, config, classes
