"""Moving a direction from one model's space to the other's through the shared dictionary (METHOD §9).

A direction ``v`` in model A's raw activation space is compared with the A-side decoders of the
*shared* features; the ``k`` most similar (cosine ≥ ``min_cosine``) vote for the transferred
direction with their B-side decoders, weighted by their cosines:

    t = Σ_j cos(v, d_j^A) · d_j^B / Σ_j cos(v, d_j^A)

With ``signed=True`` (our default) the ``k`` features are chosen by ``|cos|`` and anti-aligned ones
vote with a negative weight, ``t = Σ cos_j · d_j^B / Σ |cos_j|``. A persona vector is a
*difference* of two conditions, so the features of the suppressed pole point against it; the
paper's recipe (``signed=False``: the ``k`` largest positive cosines) ignores them. On the zoo's
sentiment vector the signed version transfers in both directions where the unsigned one does not
(see the README's transfer section for the numbers).

The result is rescaled so that its size relative to model B's typical activation norm equals
``v``'s size relative to model A's (the crosscoder's normalisation scalars carry both medians), so
that ``α`` means the same in both models. The largest cosine between ``v`` and *any* decoder of its
model is reported too: when it is high, the "transfer" is just one learned feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model import Crosscoder


@dataclass
class TransferResult:
    vector: Tensor  # [d_target], the target model's raw scale
    features: Tensor  # LongTensor of the shared features used
    cosines: Tensor  # their cosines with the input direction
    source: str
    target: str
    max_decoder_cosine: float  # largest |cosine| between the input and any source-side decoder
    max_decoder_feature: int

    def summary(self) -> dict:
        return {"source": self.source, "target": self.target, "features": self.features.tolist(),
                "cosines": [round(float(c), 4) for c in self.cosines], "norm": float(self.vector.norm()),
                "max_decoder_cosine": round(self.max_decoder_cosine, 4),
                "max_decoder_feature": self.max_decoder_feature}


def shared_feature_ids(model: Crosscoder, relative_norm_band: tuple[float, float] = (0.1, 0.9)) -> Tensor:
    """Features with a decoder in both models: the DFC shared partition, otherwise the features
    whose relative decoder norm lies inside ``relative_norm_band``."""
    if model.config.architecture == "dfc":
        return model.index_shared.cpu()
    r = model.relative_norm().detach().cpu()
    low, high = relative_norm_band
    return torch.nonzero((r > low) & (r < high)).squeeze(1)


@torch.no_grad()
def transfer_vector(model: Crosscoder, v: Tensor, source: str = "a", k: int = 10, min_cosine: float = 0.0,
                    signed: bool = True) -> TransferResult:
    """Map ``v`` (``source``'s raw space) into the other model's raw space; see the module docstring."""
    if source not in ("a", "b"):
        raise ValueError(f"source must be 'a' or 'b', got {source!r}")
    if k < 1:
        raise ValueError(f"transfer_vector: k={k}; at least one shared feature must vote")
    target = "b" if source == "a" else "a"
    width = model.config.d_a if source == "a" else model.config.d_b
    v = v.detach().float().cpu().reshape(-1)
    if v.numel() != width:
        raise ValueError(f"transfer_vector: v has {v.numel()} entries, model {source.upper()} has width {width}")
    if not torch.isfinite(v).all():
        raise ValueError("transfer_vector: v holds NaN or infinite values")
    if float(v.norm()) == 0:
        raise ValueError("transfer_vector: v is the zero vector")
    dec_source = model.decoder_raw(source).detach().float().cpu()
    dec_target = model.decoder_raw(target).detach().float().cpu()
    unit = v / v.norm()
    all_cos = torch.nn.functional.normalize(dec_source, dim=1) @ unit
    all_cos = torch.where(dec_source.norm(dim=1) > 0, all_cos, torch.zeros_like(all_cos))
    top_any = int(all_cos.abs().argmax())
    shared = shared_feature_ids(model)
    cos = all_cos[shared]
    strength = cos.abs() if signed else cos
    order = torch.argsort(strength, descending=True)[:k]
    keep = order[strength[order] >= max(min_cosine, 1e-12)]
    if keep.numel() == 0:
        raise ValueError(f"transfer_vector: no shared feature has cosine ≥ {min_cosine} with v; lower min_cosine "
                         "or check that v lies in model " + source.upper() + "'s space")
    features, cosines = shared[keep], cos[keep]
    direction = (cosines[:, None] * dec_target[features]).sum(0) / cosines.abs().sum()
    # the votes can cancel (two features that point opposite ways in the source, alike in the target):
    # rescaling what is left would turn rounding noise into a full-size vector
    votes = (cosines.abs()[:, None] * dec_target[features]).norm(dim=1).sum() / cosines.abs().sum()
    if float(direction.norm()) <= 1e-6 * float(votes):
        raise ValueError(f"transfer_vector: the {features.numel()} voting shared features cancel out in model "
                         f"{target.upper()}; v has no transferable direction through this dictionary")
    # Same size relative to the target's median activation norm as v has relative to the source's.
    scale_source, scale_target = (model.norm_scales[0], model.norm_scales[1]) if source == "a" else \
        (model.norm_scales[1], model.norm_scales[0])
    target_norm = float(v.norm()) * float(scale_source) / float(scale_target)
    vector = direction / direction.norm().clamp_min(1e-12) * target_norm
    return TransferResult(vector=vector, features=features, cosines=cosines, source=source, target=target,
                          max_decoder_cosine=float(all_cos[top_any].abs()), max_decoder_feature=top_any)


def random_direction_like(v: Tensor, seed: int = 0) -> Tensor:
    """A random direction with the norm of ``v`` (the control for a transfer)."""
    generator = torch.Generator().manual_seed(seed)
    r = torch.randn(v.numel(), generator=generator)
    return r / r.norm() * v.float().norm()
