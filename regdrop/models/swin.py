"""Swin-F: timm's SwinTransformer at the size of the early-dropout paper.

Liu et al. (ICML 2023) define Swin-Femto as a Swin Transformer with embedding 40, stage
depths 2-2-6-2 and heads 2-4-8-16 (20 channels per head in every stage); timm has no such
preset, so it is built from timm's ``SwinTransformer`` class with those arguments (4.8M
parameters at 224 px with 10 classes, 5.2M with 1000).

Patches and windows follow the image size. For ImageNet-sized input, Swin's own 4 px
patches and 7 x 7 windows (grids 56-28-14-7; the last stage is one window). For images up
to 64 px, 2 px patches and 4 x 4 windows: a 32 px image gives grids 16-8-4-2, so the
first two stages have shifted windows that tile the grid exactly and the third is one
window, as at 224 px (timm shrinks the window to the 2 x 2 grid of the last stage, and
pads grids that the window does not divide, e.g. 7 x 7 for 28 px input).
``patch_size`` and ``window_size`` override the choice.

Sites: timm's dropouts become drop sites (``token`` for projections and MLPs, ``attn``
for attention probabilities, ``fc`` for the head), and the explicit attention path is
used so the ``attn`` sites run. timm's own drop path is built at rate 0 (absent): stochastic
depth wraps the ``SwinTransformerBlock``s instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.models.swin_transformer import SwinTransformer

from regdrop.data import DataInfo
from regdrop.models.vit import (
    EARLY_DROPOUT_DEFAULTS,
    SMALL_IMAGE,
    explicit_attention,
    patch_size_for,
    sites_for_timm_dropouts,
)


def build_swin_femto(
    info: DataInfo,
    embed_dim: int = 40,
    depths: Sequence[int] = (2, 2, 6, 2),
    num_heads: Sequence[int] = (2, 4, 8, 16),
    patch_size: int | None = None,
    window_size: int | None = None,
) -> SwinTransformer:
    depths, num_heads = tuple(depths), tuple(num_heads)
    if len(depths) != len(num_heads):
        raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} must have "
                         "one entry per stage")
    for stage, heads in enumerate(num_heads):
        if (embed_dim * 2**stage) % heads:
            raise ValueError(f"num_heads: stage {stage} has {embed_dim * 2**stage} channels, "
                             f"not divisible by {heads} heads")
    patch = patch_size or patch_size_for(info.image_size, 4, small=2)
    if info.image_size % patch:
        raise ValueError(f"patch_size {patch} does not divide the image size {info.image_size}")
    window = window_size or (7 if info.image_size > SMALL_IMAGE else 4)
    model = SwinTransformer(
        img_size=info.image_size, patch_size=patch, in_chans=info.channels,
        num_classes=info.num_classes, embed_dim=embed_dim, depths=depths,
        num_heads=num_heads, window_size=window, drop_path_rate=0.0,
    )
    sites_for_timm_dropouts(model)
    explicit_attention(model)
    model.regdrop_method_defaults = EARLY_DROPOUT_DEFAULTS  # Liu et al.'s rates (regdrop.models.vit)
    return model
