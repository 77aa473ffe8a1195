"""timm's VisionTransformer (ViT-Tiny/16 and ViT-Base/16) with every dropout made a drop site.

Sites, following the early-dropout paper (Liu et al., ICML 2023): position embedding,
attention projection and MLP dropouts are ``token`` sites, attention probabilities an
``attn`` site, the head dropout an ``fc`` site. timm's fused attention reads its dropout
rate as a Python float, which a regdrop layer does not have, so the explicit attention
path is used (``fused_attn = False``) and the attention dropout is a real module call.
Residual blocks are timm's ``Block`` (stochastic depth finds them).

``vit_tiny`` (embed 192, 12 blocks, 3 heads; 5.7M parameters at 224 px) is the paper's
early-dropout model, ``vit_base`` (embed 768, 12 blocks, 12 heads; 86.6M) its late-dropout
model. Images up to 64 px use 4 px patches instead of 16 px ones.

Both carry Liu et al.'s rates as their recommendations (``regdrop_method_defaults``,
taken where the config leaves the rate null): ViT-T dropout 0.1 and drop path 0.5 (early
dropout / early s.d.), ViT-B drop path 0.4 (late s.d.).

This module also holds the helpers the other timm models share: `sites_for_timm_dropouts`,
`patch_size_for` and the early-dropout paper's recommendations.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from regdrop.data import DataInfo
from regdrop.methods.base import DropSite

SMALL_IMAGE = 64
# Liu et al. (ICML 2023), their official README's flags, one set for every model ("change
# --model accordingly"): the underfitting models train with dropout 0.1 or drop path 0.5
# (early dropout, early s.d.), the overfitting ones (ViT-B, Mixer-B) with drop path 0.4
# (late s.d.). Their code refuses dropout on ConvNeXt: it recommends drop path only.
EARLY_DROPOUT_DEFAULTS = {"standard": {"p": 0.1}, "stochastic_depth": {"drop_rate": 0.5}}
LATE_SD_DEFAULTS = {"stochastic_depth": {"drop_rate": 0.4}}


def sites_for_timm_dropouts(
    model: nn.Module, channels_first: tuple[str, ...] = (), conv: tuple[str, ...] = ()
) -> None:
    """Replace every plain ``nn.Dropout`` of a timm model by a `DropSite` of the right kind.

    ``attn_drop`` is an ``attn`` site; the classifier's dropout (``head_drop``, or the
    ``drop`` of timm's ``head`` module) an ``fc`` site; dropouts inside a sub-module whose
    name ends with one of ``conv`` see ``B x C x H x W`` maps (``conv`` sites: ConvNeXt's
    1x1-conv MLP); every other dropout a ``token`` site. Token dropouts inside a sub-module
    whose name ends with one of ``channels_first`` see their features on axis 1 (MLP-Mixer's
    token-mixing MLP runs on ``B x C x T``).
    """
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Dropout:
            continue
        parent_name, _, leaf = name.rpartition(".")
        axis = None
        if leaf == "attn_drop":
            kind = "attn"
        elif leaf == "head_drop" or parent_name.rpartition(".")[2] == "head":
            kind = "fc"
        elif conv and parent_name.endswith(conv):
            kind = "conv"
        else:
            kind = "token"
            axis = 1 if channels_first and parent_name.endswith(channels_first) else None
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, DropSite(kind, feature_axis=axis))


def explicit_attention(model: nn.Module) -> None:
    """Turn off timm's fused attention everywhere, so that ``attn_drop`` sites are called.

    Fused attention passes ``attn_drop.p`` to ``scaled_dot_product_attention`` and never
    calls the module: a `DropSite` (or regdrop layer) there would not run.
    """
    for module in model.modules():
        if hasattr(module, "fused_attn") and hasattr(module, "attn_drop"):
            module.fused_attn = False


def patch_size_for(image_size: int, large: int, small: int | None = None) -> int:
    """``large`` for big images; for images up to 64 px the divisor of the size nearest
    ``small`` (default ``large / 4``)."""
    if image_size > SMALL_IMAGE:
        return large
    target = max(1, large // 4) if small is None else small
    divisors = [d for d in range(1, image_size + 1) if image_size % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def build_vit(
    info: DataInfo, *, embed_dim: int, depth: int, num_heads: int, patch_size: int | None
) -> VisionTransformer:
    """A timm ViT with 16 px patches (4 px for images up to 64 px), sites for its dropouts."""
    patch = patch_size or patch_size_for(info.image_size, 16)
    if info.image_size % patch:
        raise ValueError(f"patch_size {patch} does not divide the image size {info.image_size}")
    model = VisionTransformer(
        img_size=info.image_size, patch_size=patch, in_chans=info.channels,
        num_classes=info.num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
    )
    sites_for_timm_dropouts(model)
    explicit_attention(model)
    return model


def build_vit_tiny(
    info: DataInfo,
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 3,
    patch_size: int | None = None,
) -> VisionTransformer:
    """ViT-Tiny/16 (Liu et al.'s early-dropout model)."""
    model = build_vit(info, embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size)
    model.regdrop_method_defaults = EARLY_DROPOUT_DEFAULTS
    return model


def build_vit_base(
    info: DataInfo,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    patch_size: int | None = None,
) -> VisionTransformer:
    """ViT-Base/16 (Liu et al.'s late-stochastic-depth model)."""
    model = build_vit(info, embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size)
    model.regdrop_method_defaults = LATE_SD_DEFAULTS
    return model
