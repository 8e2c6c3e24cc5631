"""Function-preserving channel rescaling, and the outlier stress built from it.

In a pre-norm block three activation tensors can have any channel multiplied by f > 0 without
changing what the block computes, because the next layer that reads them is linear in them:

- "attn-in": LayerNorm norm1's output, read by the depthwise q/k/v convolutions (per channel,
  no bias; the BatchNorm after them follows when its running mean and bias scale too) and by
  the q/k/v Linears (cls token; the convs' outputs) -> divide those Linears' input columns by f;
- "mlp-in": norm2's output, read only by fc1 -> divide fc1's input columns by f;
- "attn-out": v (rows of proj_v, and its bias), which attention mixes over tokens but never over
  channels -> the channels of attn·v scale by f -> divide the output projection's columns by f.

The MLP's hidden channels have no such inverse (GELU(f·x) is not f·GELU(x)), so neither the
stress nor the smoothing touches them; the BatchNorm's running variance and weight never change.

`stress` multiplies a few channels by 10-100x, as trained transformers' LayerNorm outputs are
(the reverse of SmoothQuant's migration): FP32 logits stay the same while per-tensor INT8
activation ranges get the shape that breaks them. `cvt_export.smoothing` divides by factors
measured on calibration images (SmoothQuant's migration), through the same `rescale`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from cvt_ref.model import Block, ConvProjection, CvT, Stage

SITES = ("attn-in", "mlp-in", "attn-out")


def blocks(model: CvT) -> Iterator[tuple[str, Block]]:
    """("stage S block B", block) in network order: the names probes and reports use."""
    for s, stage in enumerate(model.stages):
        assert isinstance(stage, Stage)
        for b, block in enumerate(stage.blocks):
            assert isinstance(block, Block)
            yield f"stage {s} block {b}", block


def site_input(block: Block, site: str) -> nn.Module:
    """The module whose output is the rescaled activation (for measuring it with a hook)."""
    return {"attn-in": block.norm1, "mlp-in": block.norm2, "attn-out": block.attn.proj_v}[site]


def consumers(block: Block, site: str) -> list[nn.Linear]:
    """The Linears whose input columns absorb the inverse factors."""
    attn = block.attn
    return {"attn-in": [attn.proj_q, attn.proj_k, attn.proj_v], "mlp-in": [block.mlp.fc1],
            "attn-out": [attn.proj]}[site]


@torch.no_grad()
def rescale(block: Block, site: str, factors: torch.Tensor) -> None:
    """Multiply the site's activation channels by `factors` [C] and divide its readers' input
    columns by them, in float64 then rounded once, so the block computes what it did."""
    f = factors.double()
    if site == "mlp-in" or site == "attn-in":
        norm = block.norm1 if site == "attn-in" else block.norm2
        _scale_(norm.weight, f)
        _scale_(norm.bias, f)
    if site == "attn-in":
        for proj in (block.attn.conv_proj_q, block.attn.conv_proj_k, block.attn.conv_proj_v):
            _scale_projection(proj, f)
    elif site == "attn-out":
        v = block.attn.proj_v
        _scale_(v.weight, f[:, None])
        if v.bias is not None:
            _scale_(v.bias, f)
    elif site != "mlp-in":
        raise ValueError(f"unknown site {site!r}; use one of {', '.join(SITES)}")
    for linear in consumers(block, site):
        _scale_(linear.weight, 1.0 / f[None, :])


def _scale_(t: torch.Tensor, f: torch.Tensor) -> None:
    t.copy_((t.double() * f).to(t.dtype))


def _scale_projection(proj: ConvProjection, f: torch.Tensor) -> None:
    """conv(f·x) = f·conv(x) per channel (depthwise, no bias); BatchNorm((f·y)) = f·BatchNorm(y)
    when its running mean and bias scale by f (the variance and weight stay). Folded: the bias."""
    if isinstance(proj.bn, nn.BatchNorm2d):
        assert proj.bn.running_mean is not None
        _scale_(proj.bn.running_mean, f)
        _scale_(proj.bn.bias, f)
    elif proj.conv.bias is not None:
        _scale_(proj.conv.bias, f)


@dataclass(frozen=True)
class OutlierSpec:
    """`channels` channels of every site of a seeded third of the blocks (at least one), each
    multiplied by a factor drawn log-uniformly in [low, high]."""

    channels: int
    seed: int = 0
    low: float = 10.0
    high: float = 100.0
    share: float = 1 / 3

    def describe(self) -> str:
        return (f"{self.channels} channels x{self.low:g}-{self.high:g} at {', '.join(SITES)} "
                f"of a third of the blocks (seed {self.seed})")


def stress(model: CvT, spec: OutlierSpec) -> dict[str, dict[str, list[int]]]:
    """Give `model` trained-transformer-like outlier channels without changing its function;
    returns {block: {site: [channels]}} of what was stressed."""
    if spec.channels < 0:
        raise ValueError("outlier channels must be >= 0")
    named = list(blocks(model))
    if spec.channels == 0 or not named:
        return {}
    g = torch.Generator().manual_seed(spec.seed)
    count = max(1, round(len(named) * spec.share))
    chosen = sorted(torch.randperm(len(named), generator=g)[:count].tolist())
    done: dict[str, dict[str, list[int]]] = {}
    for i in chosen:
        name, block = named[i]
        dim = block.norm1.weight.numel()
        done[name] = {}
        for site in SITES:
            picked = torch.randperm(dim, generator=g)[:min(spec.channels, dim)]
            log_f = torch.rand(len(picked), generator=g, dtype=torch.float64) \
                * (torch.log(torch.tensor(spec.high / spec.low, dtype=torch.float64))) \
                + torch.log(torch.tensor(spec.low, dtype=torch.float64))
            factors = torch.ones(dim, dtype=torch.float64)
            factors[picked] = torch.exp(log_f)
            rescale(block, site, factors)
            done[name][site] = sorted(picked.tolist())
    return done


def channel_ranges(model: CvT, x: torch.Tensor) -> Mapping[str, Mapping[str, torch.Tensor]]:
    """Per block and site, each channel's largest |activation| over `x` [B, 3, H, W]."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, block in blocks(model):
        found[name] = {}
        for site in SITES:
            def keep(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name,
                     site: str = site) -> None:
                peak = out.detach().abs().flatten(0, -2).amax(0)
                old = found[name].get(site)
                found[name][site] = peak if old is None else torch.maximum(old, peak)
            hooks.append(site_input(block, site).register_forward_hook(keep))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return found
