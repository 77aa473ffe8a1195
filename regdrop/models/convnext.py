"""ConvNeXt-F: timm's ``convnext_femto``, built offline (``pretrained=False``).

ConvNeXt-Femto (timm; the early-dropout paper's ConvNeXt-F): stage depths 2-2-6-2, widths
48-96-192-384, 1x1-conv MLPs, layer scale initialised at 1e-6; 5.2M parameters at 224 px
and 1000 classes. ``width`` scales the stage widths and ``depths`` the stages, for quick
runs.

Liu et al. train ConvNeXt-F with stochastic depth only (their table has no dropout row
for it), but the model honestly has dropout sites, declared here: timm's MLP dropouts in
every block act on ``B x C x H x W`` maps (``conv`` sites) and the head dropout on the
pooled features (an ``fc`` site). Residual blocks are timm's ``ConvNeXtBlock`` (stochastic
depth wraps them); timm's own drop path is built at rate 0.

The stem is a ``patch_size`` x ``patch_size`` stride-``patch_size`` conv: 4 for
ImageNet-sized input (grids 56-28-14-7 at 224 px), 1 for images up to 64 px (grids
32-16-8-4 at 32 px, 28-14-7-3 at 28 px). Not 2: timm keeps ConvNeXt's total stride at 32
by making the first stage downsample when the stem stride is 2, which would leave a 1 x 1
grid (or none) at the last stage of a 28-32 px image.
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.models.convnext import ConvNeXt, convnext_femto

from regdrop.data import DataInfo
from regdrop.models.lenet import scaled
from regdrop.models.vit import EARLY_DROPOUT_DEFAULTS, patch_size_for, sites_for_timm_dropouts

FEMTO_DIMS = (48, 96, 192, 384)


def build_convnext_femto(
    info: DataInfo,
    width: float = 1.0,
    depths: Sequence[int] = (2, 2, 6, 2),
    patch_size: int | None = None,
) -> ConvNeXt:
    depths = tuple(depths)
    if len(depths) != len(FEMTO_DIMS):
        raise ValueError(f"depths must give {len(FEMTO_DIMS)} stages, got {list(depths)}")
    patch = patch_size or patch_size_for(info.image_size, 4, small=1)
    model = convnext_femto(
        pretrained=False, in_chans=info.channels, num_classes=info.num_classes,
        dims=tuple(scaled(d, width) for d in FEMTO_DIMS), depths=depths, patch_size=patch,
        drop_path_rate=0.0,
    )
    sites_for_timm_dropouts(model, conv=("mlp",))
    # Liu et al.'s early-s.d. rate; no dropout rate: their code refuses dropout on ConvNeXt.
    model.regdrop_method_defaults = {"stochastic_depth": EARLY_DROPOUT_DEFAULTS["stochastic_depth"]}
    return model
