"""timm's MLP-Mixer (Mixer-S/16 or S/32 by default) with its dropouts made drop sites.

The MLP dropouts are ``token`` sites, the head dropout an ``fc`` site. timm runs the
token-mixing MLP on the transposed activation ``B x C x T``, so its sites declare their
features on axis 1: spatial and gyro dropout then mask channels there too, not patches. Residual blocks are timm's
``MixerBlock``. Images up to 64 px use patches a quarter of the size's name (s16 -> 4 px,
s32 -> 8 px, or the nearest divisor of the image size).
"""

from __future__ import annotations

from timm.models.mlp_mixer import MlpMixer

from regdrop.data import DataInfo
from regdrop.models.vit import patch_size_for, sites_for_timm_dropouts

PATCH = {"s16": 16, "s32": 32}


def build_mixer(info: DataInfo, size: str = "s16", embed_dim: int = 512, depth: int = 8) -> MlpMixer:
    if size not in PATCH:
        raise ValueError(f"size must be one of {list(PATCH)}, got {size!r}")
    patch = patch_size_for(info.image_size, PATCH[size])
    model = MlpMixer(
        num_classes=info.num_classes, img_size=info.image_size, in_chans=info.channels,
        patch_size=patch, num_blocks=depth, embed_dim=embed_dim,
    )
    sites_for_timm_dropouts(model, channels_first=("mlp_tokens",))
    return model
