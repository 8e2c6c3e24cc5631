"""The reference model against transformers and the original code's semantics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import cvt_ref
from cvt_ref.model import ConvProjection
from tests.conftest import QuickGELU, hf_model

TOL = 1e-5


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def hf_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(pixel_values=x).logits  # type: ignore[no-any-return]


def ref_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["cvt-13", pytest.param("cvt-13-384", marks=pytest.mark.slow)])
def test_full_size_parity_with_transformers_on_photos(
        name: str, photos: list[Path], hf_folder: Callable[[cvt_ref.Variant], Path]) -> None:
    variant = cvt_ref.VARIANTS[name]
    folder = hf_folder(variant)
    x = cvt_ref.preprocess_batch(list(photos), name)
    assert x.shape == (len(photos), 3, variant.image_size, variant.image_size)
    from transformers import CvtForImageClassification

    expected = hf_logits(CvtForImageClassification.from_pretrained(folder).eval(), x)
    model = cvt_ref.create_model(name, folder)
    assert model.activation == "gelu" and model.weights is not None
    assert model.weights.kind == "transformers"
    got = ref_logits(model, x)
    assert got.shape == (len(photos), 1000) and got.dtype == torch.float32
    assert float(expected.std()) > 0.3  # logits are not degenerate: the check has teeth
    assert max_abs(got, expected) <= TOL
    # the photos are told apart: the model is not a constant function of its input
    assert len(set(expected.argmax(-1).tolist())) > 1


def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", list(cvt_ref.VARIANTS))
def test_architecture_of_every_variant_matches_transformers(name: str) -> None:
    """Full-size shapes on the meta device (no memory): every tensor has its counterpart."""
    from transformers import CvtConfig, CvtForImageClassification

    from cvt_ref.weights import to_native_keys

    variant = cvt_ref.VARIANTS[name]
    with torch.device("meta"):
        hf = CvtForImageClassification(CvtConfig(**variant.hf_config()))
        ours = cvt_ref.CvT(variant)
    mapped, kind = to_native_keys(hf.state_dict(), "hf")
    assert kind == "transformers"
    assert {k: tuple(v.shape) for k, v in mapped.items()} == _meta_shapes(ours)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cvt-21", "cvt-21-384-22k", "cvt-w24-384-22k"])
def test_reduced_depth_parity_for_the_other_architectures(name: str, batch_224: torch.Tensor,
                                                           photos: list[Path]) -> None:
    """Same widths, heads and image size as the variant, fewer blocks (speed)."""
    # transformers indexes drop_path_rates[stage] within a stage, so depth must exceed the
    # stage index: (1, 2, 3) is the smallest copy it can build.
    variant = cvt_ref.VARIANTS[name].with_depths(1, 2, 3)
    hf = hf_model(variant, seed=3)
    x = batch_224[:3] if variant.image_size == 224 else cvt_ref.preprocess_batch(list(photos[:3]), variant)
    model = cvt_ref.CvT(variant)
    from cvt_ref.weights import load_state_strict, to_native_keys

    load_state_strict(model, to_native_keys(hf.state_dict(), "hf")[0], "hf")
    assert max_abs(ref_logits(model.eval(), x), hf_logits(hf, x)) <= TOL


def original_state_dict(hf: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The same weights under the original code's (cls_cvt.py) names, by walking transformers'
    module tree: an independent route from cvt_ref's key-renaming rules."""
    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, module: torch.nn.Module) -> None:
        for key, value in module.state_dict().items():
            out[f"{prefix}.{key}"] = value.clone()

    for i, stage in enumerate(hf.cvt.encoder.stages):  # type: ignore[union-attr, arg-type]
        put(f"stage{i}.patch_embed.proj", stage.embedding.convolution_embeddings.projection)
        put(f"stage{i}.patch_embed.norm", stage.embedding.convolution_embeddings.normalization)
        if hf.config.cls_token[i]:  # type: ignore[union-attr, index]
            out[f"stage{i}.cls_token"] = stage.cls_token.detach().clone()
        for j, layer in enumerate(stage.layers):
            att = layer.attention.attention
            p = f"stage{i}.blocks.{j}"
            put(f"{p}.norm1", layer.layernorm_before)
            for short, long in (("q", "query"), ("k", "key"), ("v", "value")):
                proj = getattr(att, f"convolution_projection_{long}").convolution_projection
                put(f"{p}.attn.conv_proj_{short}.conv", proj.convolution)
                put(f"{p}.attn.conv_proj_{short}.bn", proj.normalization)
                put(f"{p}.attn.proj_{short}", getattr(att, f"projection_{long}"))
            put(f"{p}.attn.proj", layer.attention.output.dense)
            put(f"{p}.norm2", layer.layernorm_after)
            put(f"{p}.mlp.fc1", layer.intermediate.dense)
            put(f"{p}.mlp.fc2", layer.output.dense)
    put("norm", hf.layernorm)  # type: ignore[arg-type]
    put("head", hf.classifier)  # type: ignore[arg-type]
    return out


@pytest.mark.heavy
def test_original_checkpoint_with_quickgelu_matches_transformers_with_quickgelu(
        tmp_path: Path, batch_224: torch.Tensor) -> None:
    variant = cvt_ref.VARIANTS["cvt-13"]
    hf = hf_model(variant, seed=7)
    for stage in hf.cvt.encoder.stages:  # type: ignore[union-attr]
        for layer in stage.layers:  # type: ignore[union-attr]
            layer.intermediate.activation = QuickGELU()
    expected = hf_logits(hf, batch_224)

    path = tmp_path / "CvT-13-224x224-IN-1k.pth"
    torch.save(original_state_dict(hf), path)
    model = cvt_ref.create_model("cvt-13", path)
    assert model.weights is not None and model.weights.kind == "original"
    assert model.activation == "quick_gelu"  # the default follows the checkpoint's source
    assert max_abs(ref_logits(model, batch_224), expected) <= TOL
    # and the activation matters: exact GELU on the same weights gives other logits
    gelu = cvt_ref.create_model("cvt-13", path, activation="gelu")
    assert max_abs(ref_logits(gelu, batch_224), expected) > 1e-2


def test_batchnorm_folding_keeps_logits(batch_224: torch.Tensor) -> None:
    model = cvt_ref.create_model("cvt-13", "random:1")
    before = ref_logits(model, batch_224)
    model.fold_batchnorm()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    projections = [m for m in model.modules() if isinstance(m, ConvProjection)]
    assert len(projections) == 3 * sum(model.variant.depths)
    assert all(p.conv.bias is not None for p in projections)
    assert max_abs(ref_logits(model, batch_224), before) <= TOL


def test_batch_rows_equal_single_images(batch_224: torch.Tensor) -> None:
    model = cvt_ref.create_model("cvt-13", "random:2")
    batch = batch_224[:7]
    together = ref_logits(model, batch)
    for i in range(7):
        alone = ref_logits(model, batch[i:i + 1])
        assert alone.shape == (1, 1000)  # batch 1 keeps its batch axis (no squeeze bug)
        assert max_abs(alone[0], together[i]) <= TOL


def test_random_weights_are_deterministic_per_seed(batch_224: torch.Tensor) -> None:
    x = batch_224[:2]
    a = ref_logits(cvt_ref.create_model("cvt-13", "random:5"), x)
    b = ref_logits(cvt_ref.create_model("cvt-13", "random:5"), x)
    c = ref_logits(cvt_ref.create_model("cvt-13", "random:6"), x)
    assert torch.equal(a, b)
    assert max_abs(a, c) > 0.1


@pytest.mark.parametrize("name", list(cvt_ref.VARIANTS))
def test_parameter_count_matches_published(name: str) -> None:
    variant = cvt_ref.VARIANTS[name]
    with torch.device("meta"):
        model = cvt_ref.CvT(variant)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert variant.published is not None
    # published figures are rounded to whole millions
    assert abs(params_m - variant.published.params_m) <= 0.5 + 0.01 * variant.published.params_m


@pytest.mark.parametrize("name", list(cvt_ref.VARIANTS))
def test_flops_match_published(name: str) -> None:
    """Multiply-accumulates of one image, counted by PyTorch on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    variant = cvt_ref.VARIANTS[name]
    with torch.device("meta"):
        model = cvt_ref.CvT(variant).eval()
        x = torch.empty(1, 3, variant.image_size, variant.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    gmacs = counter.get_total_flops() / 2 / 1e9
    assert variant.published is not None
    assert abs(gmacs - variant.published.gflops) <= 0.05 * variant.published.gflops
