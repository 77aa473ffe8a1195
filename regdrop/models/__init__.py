"""Model zoo: each builder adapts a real torchvision/timm model to the data and declares
where its dropout sites (`DropSite` placeholders) and residual blocks are.

`build_model(cfg, info)` picks the builder named by ``model.name``; the other keys of the
``model`` section are that builder's keyword arguments. The models by paper:

* Gyro dropout (Lee et al. 2022): ``lenet``, ``alexnet``, ``resnet18``.
* Early/late dropout (Liu et al. 2023): ``vit_tiny``, ``vit_base``, ``mixer`` (sizes
  S/16, S/32, B/16, B/32), ``swin_femto``, ``convnext_femto``.
* Stochastic depth (Huang et al. 2016): ``resnet110``, ``resnet56``; Composer's card:
  ``resnet50``, ``resnet101``.
* DropConnect (Wan et al. 2013): ``mlp`` (MNIST), ``cuda_convnet`` (CIFAR-10).
* Multi-sample dropout (Inoue 2019): ``vgg16``.

A model may also carry ``regdrop_dropconnect_layers``, the Linear layers DropConnect
masks by default (the classifier's hidden FC layers), and ``regdrop_method_defaults``,
the hyper-parameters its paper recommends per method (``{"gyro": {"sigma": 1024, "tau":
8}}`` on the ResNets), which apply unless the config sets them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from regdrop.data import DataInfo
from regdrop.errors import ConfigError
from regdrop.models.alexnet import build_alexnet
from regdrop.models.convnext import build_convnext_femto
from regdrop.models.cuda_convnet import build_cuda_convnet
from regdrop.models.lenet import build_lenet
from regdrop.models.mixer import build_mixer
from regdrop.models.mlp import build_mlp
from regdrop.models.resnet import (
    build_resnet18,
    build_resnet50,
    build_resnet56,
    build_resnet101,
    build_resnet110,
)
from regdrop.models.swin import build_swin_femto
from regdrop.models.vgg import build_vgg16
from regdrop.models.vit import build_vit_base, build_vit_tiny

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": build_lenet,
    "alexnet": build_alexnet,
    "resnet18": build_resnet18,
    "resnet50": build_resnet50,
    "resnet101": build_resnet101,
    "resnet56": build_resnet56,
    "resnet110": build_resnet110,
    "vit_tiny": build_vit_tiny,
    "vit_base": build_vit_base,
    "mixer": build_mixer,
    "swin_femto": build_swin_femto,
    "convnext_femto": build_convnext_femto,
    "mlp": build_mlp,
    "cuda_convnet": build_cuda_convnet,
    "vgg16": build_vgg16,
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


def check_model(cfg) -> None:
    """Check the config ``model`` section without building: the name, and that every key is
    an argument of the model's builder (values are checked by building it on the meta
    device, see `regdrop.config.validate`)."""
    options = dict(cfg)
    name = options.pop("name")
    if name not in MODELS:
        raise ConfigError("model.name", f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    valid = [p for p in inspect.signature(MODELS[name]).parameters if p != "info"]
    for key in options:
        if key not in valid:
            raise ConfigError(f"model.{key}", f"not an option of model {name!r}; valid: {', '.join(valid)}")
