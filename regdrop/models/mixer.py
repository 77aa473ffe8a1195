"""timm's MLP-Mixer (Mixer-S/16, S/32, B/16, B/32) with its dropouts made drop sites.

Sizes (Tolstikhin et al. 2021): S has embed 512 and 8 blocks, B embed 768 and 12 blocks;
both use token-mixing MLPs of half the embedding and channel-mixing MLPs of four times
it (timm's default ``mlp_ratio``). Parameters at 224 px and 1000 classes: Mixer-S/32
19.1M, Mixer-B/16 59.9M. ``embed_dim`` and ``depth`` default to the size's and shrink it
for quick runs. Liu et al. use Mixer-S/32 (early dropout) and Mixer-B/16 (late s.d.);
the S sizes recommend their early-dropout rates, the B sizes their late-s.d. rate
(``regdrop_method_defaults``, see `regdrop.models.vit`).

The MLP dropouts are ``token`` sites, the head dropout an ``fc`` site. timm runs the
token-mixing MLP on the transposed activation ``B x C x T``, so its sites declare their
features on axis 1: spatial and gyro dropout then mask channels there too, not patches.
Residual blocks are timm's ``MixerBlock``. Images up to 64 px use patches a quarter of
the size's (/16 -> 4 px, /32 -> 8 px, or the nearest divisor of the image size), so a
28-32 px image still gives a grid of tokens.
"""

from __future__ import annotations

from timm.models.mlp_mixer import MlpMixer

from regdrop.data import DataInfo
from regdrop.models.vit import (
    EARLY_DROPOUT_DEFAULTS,
    LATE_SD_DEFAULTS,
    patch_size_for,
    sites_for_timm_dropouts,
)

# size -> (patch, embed_dim, depth)
SIZES = {"s16": (16, 512, 8), "s32": (32, 512, 8), "b16": (16, 768, 12), "b32": (32, 768, 12)}


def build_mixer(
    info: DataInfo, size: str = "s16", embed_dim: int | None = None, depth: int | None = None
) -> MlpMixer:
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    large_patch, size_embed, size_depth = SIZES[size]
    model = MlpMixer(
        num_classes=info.num_classes, img_size=info.image_size, in_chans=info.channels,
        patch_size=patch_size_for(info.image_size, large_patch),
        num_blocks=size_depth if depth is None else depth,
        embed_dim=size_embed if embed_dim is None else embed_dim,
    )
    sites_for_timm_dropouts(model, channels_first=("mlp_tokens",))
    model.regdrop_method_defaults = EARLY_DROPOUT_DEFAULTS if size.startswith("s") else LATE_SD_DEFAULTS
    return model
