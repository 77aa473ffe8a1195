"""timm's VisionTransformer (ViT-Tiny by default) with every dropout made a drop site.

Sites, following the early-dropout paper (Liu et al., ICML 2023): position embedding,
attention projection and MLP dropouts are ``token`` sites, attention probabilities an
``attn`` site, the head dropout an ``fc`` site. timm's fused attention reads its dropout
rate as a Python float, which a regdrop layer does not have, so the explicit attention
path is used (``fused_attn = False``) and the attention dropout is a real module call.
Residual blocks are timm's ``Block`` (stochastic depth finds them).
"""

from __future__ import annotations

from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

from regdrop.data import DataInfo
from regdrop.methods.base import DropSite

SMALL_IMAGE = 64


def sites_for_timm_dropouts(model: nn.Module, channels_first: tuple[str, ...] = ()) -> None:
    """Replace every plain ``nn.Dropout`` of a timm model by a `DropSite` of the right kind.

    Dropouts inside a sub-module whose name ends with one of ``channels_first`` see their
    features on axis 1 (MLP-Mixer's token-mixing MLP runs on ``B x C x T``).
    """
    for name, module in list(model.named_modules()):
        if type(module) is nn.Dropout:
            parent_name, _, leaf = name.rpartition(".")
            kind = {"attn_drop": "attn", "head_drop": "fc"}.get(leaf, "token")
            axis = 1 if parent_name.endswith(channels_first) and channels_first else None
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, DropSite(kind, feature_axis=axis))


def patch_size_for(image_size: int, large: int) -> int:
    """``large`` for big images; for small ones the divisor of the size nearest large/4."""
    if image_size > SMALL_IMAGE:
        return large
    target = max(1, large // 4)
    divisors = [d for d in range(1, image_size + 1) if image_size % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def build_vit_tiny(
    info: DataInfo,
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 3,
    patch_size: int | None = None,
) -> VisionTransformer:
    patch = patch_size or patch_size_for(info.image_size, 16)
    if info.image_size % patch:
        raise ValueError(f"patch_size {patch} does not divide the image size {info.image_size}")
    model = VisionTransformer(
        img_size=info.image_size, patch_size=patch, in_chans=info.channels,
        num_classes=info.num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
    )
    sites_for_timm_dropouts(model)
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = False
    return model
