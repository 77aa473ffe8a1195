"""Model zoo: each builder adapts a real torchvision/timm model to the data and declares
where its dropout sites (`DropSite` placeholders) and residual blocks are.

`build_model(cfg, info)` picks the builder named by ``model.name``. A model may also carry
``regdrop_dropconnect_layers``: the Linear layers DropConnect masks by default (the
classifier's hidden FC layers).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from regdrop.data import DataInfo
from regdrop.errors import ConfigError
from regdrop.models.alexnet import build_alexnet
from regdrop.models.lenet import build_lenet
from regdrop.models.mixer import build_mixer
from regdrop.models.resnet import build_resnet18, build_resnet50
from regdrop.models.vit import build_vit_tiny

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": build_lenet,
    "alexnet": build_alexnet,
    "resnet18": build_resnet18,
    "resnet50": build_resnet50,
    "vit_tiny": build_vit_tiny,
    "mixer": build_mixer,
}


def build_model(cfg, info: DataInfo) -> nn.Module:
    """Build the model that the config ``model`` section names, sized for ``info``'s data."""
    options = dict(cfg)
    name = options.pop("name")
    if name not in MODELS:
        raise ConfigError("model.name", f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    try:
        return MODELS[name](info, **options)
    except TypeError as err:
        raise ConfigError("model", f"{name}: {err}") from None
    except ValueError as err:
        raise ConfigError("model", f"{name}: {err}") from None
