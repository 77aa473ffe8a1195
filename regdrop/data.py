"""Data sets: real ones read offline (Fashion-MNIST, CIFAR-10/100, ImageNet) and synthetic.

Small data sets that fit in memory (Fashion-MNIST, CIFAR, synthetic) take a fast tensor
path: the whole set is held as one uint8 tensor and batches are sliced, normalised and
augmented on the fly with vectorised tensor ops, instead of decoding a PIL image per
sample per epoch. ImageNet goes through torchvision's ImageFolder and DataLoader workers.

Augmentation (``data`` keys), on both paths as the papers' code does it:

* ``augment``: random crop + horizontal flip (in memory: zero padding of 4 px, 2 px for
  Fashion-MNIST; ImageNet: random resized crop);
* ``crop_size`` (in memory): train on random ``crop_size`` crops without padding, test on
  the centre crop: the 24 px crops of the Gyro dropout authors' CIFAR code (Lee et al.,
  MLSys 2022; ``tf.random_crop`` / ``resize_image_with_crop_or_pad``);
* ``randaugment`` (needs ``augment``): a timm RandAugment policy such as
  ``rand-m9-mstd0.5-inc1`` (the early-dropout recipe), timm's own PIL implementation
  (`rand_augment_transform`) with the hyper-parameters timm's `create_transform` gives it
  (translation 45% of the size, fill with the data set's mean colour). In memory it runs
  per image on the uint8 batch after crop and flip (PIL images of 32 px cost little), the
  recipe's order; ImageNet gets timm's `create_transform` training pipeline;
* ``random_erasing`` (needs ``augment``): timm's `RandomErasing` with this probability
  (mode ``pixel``, one box), on the normalised batch;
* ``interpolation``: the resampling of RandAugment's geometric ops and of ImageNet's
  resizes (the recipe: bicubic).

timm's RandAugment and random erasing draw from Python's, numpy's and torch's global
generators; the loader seeds them per batch (`regdrop.rng.seeded_global_state`) from the same
``(seed, epoch, batch, rank)`` as its own streams, so they stay pure functions of the
batch's place in the run.

Nothing is downloaded unless ``data.download=true``; a missing data set stops the run
before training with a message naming ``data.root`` and how to get the data.

Data sets are checked, not trusted: a damaged Fashion-MNIST IDX file (Debian's .gz or the
copy unpacked under ``data.root``) or CIFAR pickle is a `DataFileError` naming the file,
what is wrong and what to do; an ImageFolder pair whose ``val/`` classes differ from
``train/``'s, or with an empty class folder, is refused before anything is read (labels
are numbered by folder, so it would train on wrong labels); an image that cannot be
decoded stops the run or is skipped and counted (``data.on_bad_image``).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from regdrop.errors import ConfigError, check_keys, check_number
from regdrop.rng import seeded_global_state, stream_generator, stream_seed

# Where Debian's dataset-fashion-mnist package puts the original IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Per-channel mean and std of the training sets (0-1 pixel scale).
STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic")
_COMMON_KEYS = {"name", "root", "download", "batch_size", "eval_batch_size", "num_workers", "subset", "augment",
                "normalize", "randaugment", "random_erasing", "interpolation"}
_IN_MEMORY_KEYS = _COMMON_KEYS | {"crop_size"}
DATA_KEYS = {
    "fashion_mnist": _IN_MEMORY_KEYS,
    "cifar10": _IN_MEMORY_KEYS,
    "cifar100": _IN_MEMORY_KEYS,
    "imagenet": _COMMON_KEYS | {"image_size", "on_bad_image"},
    "synthetic": _IN_MEMORY_KEYS | {"channels", "image_size", "num_classes", "num_train", "num_test", "noise"},
}
INTERPOLATIONS = ("bilinear", "bicubic")
# What an ImageFolder run does with an image file that cannot be decoded (``data.on_bad_image``):
# stop with a message naming the file, or leave it out of its batch and count it.
ON_BAD_IMAGE = ("stop", "skip")
# The augmentation keys a section may leave out (older configs): their "off" values.
AUGMENT_DEFAULTS = {"randaugment": None, "random_erasing": 0.0, "interpolation": "bilinear", "crop_size": None}


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    num_train: int
    num_test: int


@dataclass
class Data:
    info: DataInfo
    train: TensorLoader | DataLoader
    test: TensorLoader | DataLoader


class TensorLoader:
    """Batches of an in-memory uint8 image tensor, normalised and augmented per batch.

    Two random streams, both pure functions of ``(seed, epoch, ...)`` and independent of
    the global RNG: the ORDER of epoch ``e`` is a permutation drawn from
    stream ``data.order`` (index ``e``), and the AUGMENTATION of batch ``i`` of epoch ``e``
    from streams indexed ``(e, i, rank)`` (`regdrop.rng`). So a run resumed in the middle of an epoch
    restores its position (`state_dict`: epoch and batch) without replaying the
    augmentation of the batches it skips. Each `iter` is one epoch: the epoch set by
    `set_epoch` (as torch's ``DistributedSampler``), else the one after the last.

    A training batch is cropped and flipped (``augment``; random ``crop_size`` crops
    without padding when given, else crops of the full size after ``crop_padding`` px of
    zeros), passed through ``randaugment`` (per uint8 image), scaled to [0, 1],
    normalised, and passed through ``random_erasing``; each random op has its own stream
    (``data.crop``, ``data.randaugment``, ``data.erasing``) indexed ``(e, i, rank)``. Without ``augment`` a
    ``crop_size`` takes the centre crop (the test set's view).

    ``drop_last`` keeps every batch the same size, so that steps per epoch is
    ``len(images) // (batch_size * world_size)`` exactly. With ``world_size > 1`` every
    rank draws the same order and takes its slice of each global batch of
    ``batch_size * world_size`` samples: rank ``r`` holds samples ``r*B .. (r+1)*B - 1`` of
    it, so the global batch is the one a single process would see.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
        augment: bool = False,
        crop_padding: int = 4,
        crop_size: int | None = None,
        randaugment: Callable | None = None,
        random_erasing: Callable | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.crop_padding = crop_padding
        self.crop_size = crop_size
        self.randaugment, self.random_erasing = randaugment, random_erasing
        self.seed, self.rank, self.world_size = seed, rank, world_size
        channels = images.shape[1]
        self.mean = None if mean is None else torch.tensor(mean).view(1, channels, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(1, channels, 1, 1)
        self.epoch = 0  # the epoch the next `iter` runs
        self.position = 0  # batches of that epoch to skip (a resumed run)

    @property
    def dataset_size(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        n, step = len(self.labels), self.batch_size * self.world_size
        if self.drop_last:
            return n // step
        return math.ceil(n / step)

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Make the next `iter` run epoch ``epoch``, starting at its batch ``position``."""
        self.epoch, self.position = epoch, position

    def order(self, epoch: int) -> torch.Tensor:
        """The order of the samples in epoch ``epoch`` (the same on every rank)."""
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        generator = stream_generator(self.seed, "data.order", epoch)
        return torch.randperm(n, generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.position
        self.epoch, self.position = epoch + 1, 0
        order = self.order(epoch)
        step = self.batch_size * self.world_size
        for i in range(start, len(self)):
            first = i * step + self.rank * self.batch_size
            index = order[first : min(first + self.batch_size, (i + 1) * step)]
            yield self._prepare(self.images[index], epoch, i), self.labels[index]

    def _prepare(self, images: torch.Tensor, epoch: int = 0, batch: int = 0) -> torch.Tensor:
        def seed(stream: str) -> int:
            return stream_seed(self.seed, stream, epoch, batch, self.rank)

        x = images
        if self.augment:
            # Crop and flip move whole pixels: on uint8 they give exactly what they give on floats.
            padding = 0 if self.crop_size else self.crop_padding
            x = random_crop_flip(x, padding, torch.Generator().manual_seed(seed("data.crop")), size=self.crop_size)
        elif self.crop_size:
            x = center_crop(x, self.crop_size)
        if self.randaugment is not None:
            with seeded_global_state(seed("data.randaugment")):
                x = rand_augment_batch(x, self.randaugment)
        x = x.float().div_(255.0)
        if self.mean is not None:
            x = x.sub_(self.mean).div_(self.std)
        if self.random_erasing is not None:
            with seeded_global_state(seed("data.erasing")):
                x = self.random_erasing(x)
        return x

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"], state["position"])


def random_crop_flip(
    x: torch.Tensor, padding: int, generator: torch.Generator, size: int | None = None
) -> torch.Tensor:
    """CIFAR-style augmentation of a batch: a random ``size`` x ``size`` crop (default: the
    image's own size) after ``padding`` px of zeros, and a random horizontal flip."""
    n, _, h, w = x.shape
    out_h, out_w = (h, w) if size is None else (size, size)
    if out_h > h + 2 * padding or out_w > w + 2 * padding:
        raise ValueError(f"a {out_h} x {out_w} crop does not fit {h} x {w} images padded by {padding}")
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, h + 2 * padding - out_h + 1, (n,), generator=generator)
    dx = torch.randint(0, w + 2 * padding - out_w + 1, (n,), generator=generator)
    h, w = out_h, out_w
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1, 1, 1), cols.flip(-1), cols)
    batch = torch.arange(n).view(n, 1, 1, 1)
    channel = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    return padded[batch, channel, rows, cols]


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size`` x ``size`` crop of a batch (TensorFlow's
    ``resize_image_with_crop_or_pad`` on a larger image: offsets rounded down)."""
    h, w = x.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"a {size} px crop does not fit {h} x {w} images")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def randaugment_transform(policy: str, image_size: int, mean: tuple[float, ...] | None,
                          interpolation: str = "bilinear") -> Callable:
    """timm's RandAugment for a policy string (``rand-m9-mstd0.5-inc1``), with the
    hyper-parameters timm's `create_transform` gives it: translations up to 45% of the
    image size, the data set's mean colour as fill, the configured resampling."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    mean = mean or (0.5,)
    fill = tuple(min(255, round(255 * m)) for m in mean)
    hparams = {"translate_const": int(image_size * 0.45), "img_mean": fill if len(fill) > 1 else fill[0],
               "interpolation": {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]}
    return posterize_to_zero_bits(rand_augment_transform(policy, hparams))


def posterize_to_zero_bits(transform: Callable) -> Callable:
    """Let the posterize ops of a timm RandAugment (found anywhere in ``transform``) keep 0
    bits. timm's increasing posterize keeps ``4 - int(0.4 * magnitude)`` bits, 0 at magnitude
    10, which ``m9`` with magnitude noise reaches; PIL 10 and later refuse 0 bits (an
    error mid-epoch), older PIL returned a black image. This restores that meaning."""
    from timm.data import auto_augment

    def posterize(img, bits_to_keep, **_):
        if bits_to_keep <= 0:
            return img.point(lambda _: 0)
        return auto_augment.posterize(img, bits_to_keep)

    for op in getattr(transform, "ops", []):
        if getattr(op, "aug_fn", None) is auto_augment.posterize:
            op.aug_fn = posterize
    for inner in getattr(transform, "transforms", []):
        posterize_to_zero_bits(inner)
    return transform


def rand_augment_batch(images: torch.Tensor, transform: Callable) -> torch.Tensor:
    """Apply a PIL transform (timm's RandAugment) to every image of a uint8
    ``N x C x H x W`` batch (C = 1 or 3); returns a new uint8 batch of the same shape."""
    from PIL import Image

    if images.dtype != torch.uint8:
        raise ValueError(f"RandAugment works on uint8 images, got {images.dtype}")
    grey = images.shape[1] == 1
    pixels = images.permute(0, 2, 3, 1).numpy()
    out = np.empty_like(pixels)
    for i, image in enumerate(pixels):
        pil = Image.fromarray(image[..., 0] if grey else image, mode="L" if grey else "RGB")
        result = np.asarray(transform(pil))
        out[i] = result[..., None] if grey else result
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def random_erasing_transform(probability: float) -> Callable:
    """timm's `RandomErasing` as the early-dropout recipe uses it (mode ``pixel``: the box
    is filled with normal noise, the normalised data's scale; one box), on CPU batches."""
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability, mode="pixel", max_count=1, device="cpu")


# (channels, image size, classes, train images, test images) of the fixed data sets.
SHAPES = {
    "fashion_mnist": (1, 28, 10, 60_000, 10_000),
    "cifar10": (3, 32, 10, 50_000, 10_000),
    "cifar100": (3, 32, 100, 50_000, 10_000),
}


def check_data(cfg) -> None:
    """Check the config ``data`` section without reading any data: keys, values, and that
    the data set is where ``data.root`` says (unless ``data.download``)."""
    name = cfg.name
    if name not in DATASETS:
        raise ConfigError("data.name", f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    check_keys(cfg, "data", DATA_KEYS[name])
    for key in ("batch_size", "eval_batch_size"):
        check_number(cfg[key], f"data.{key}", integer=True, minimum=1)
    check_number(cfg.num_workers, "data.num_workers", integer=True, minimum=0)
    check_number(cfg.subset, "data.subset", integer=True, minimum=1, optional=True)
    for key in ("download", "augment", "normalize"):
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"data.{key}", f"must be true or false, got {cfg[key]!r}")
    _check_augmentation(cfg)
    if name == "synthetic":
        for key in ("channels", "image_size", "num_classes", "num_train", "num_test"):
            check_number(cfg[key], f"data.{key}", integer=True, minimum=1)
        check_number(cfg.noise, "data.noise", minimum=0)
    if name == "imagenet":
        check_number(cfg.image_size, "data.image_size", integer=True, minimum=1)
        if cfg.get("on_bad_image", "stop") not in ON_BAD_IMAGE:
            raise ConfigError("data.on_bad_image", f"must be stop (end the run naming the unreadable image) "
                              f"or skip (leave it out and count it), got {cfg.on_bad_image!r}")
    info = data_info(cfg)
    crop = augmentation(cfg)["crop_size"]
    full = cfg.image_size if name == "synthetic" else SHAPES.get(name, (0, 0))[1]
    if crop is not None and crop > full:
        raise ConfigError("data.crop_size", f"a {crop} px crop does not fit the {full} px images of {name}; "
                          f"use at most {full}, or null for full-size images")
    if cfg.subset is not None and info.num_train and cfg.subset > SHAPES.get(name, (0,) * 4)[3] > 0:
        raise ConfigError("data.subset", f"must be in 1..{SHAPES[name][3]} or null, got {cfg.subset}")
    if not cfg.download:
        _check_present(cfg)


def augmentation(cfg) -> dict:
    """The augmentation keys of a ``data`` section, the left-out ones at their "off" value."""
    return {key: cfg.get(key, default) for key, default in AUGMENT_DEFAULTS.items()}


def _check_augmentation(cfg) -> None:
    options = augmentation(cfg)
    policy = options["randaugment"]
    if policy is not None:
        try:
            if not isinstance(policy, str) or not policy.startswith("rand"):
                raise ValueError("not a RandAugment policy")
            randaugment_transform(policy, 32, None)
        except Exception as err:  # timm's parser raises assertion, key and value errors
            raise ConfigError("data.randaugment", f"{policy!r} is not a timm RandAugment policy ({err}); "
                              "use null or a string such as rand-m9-mstd0.5-inc1 (magnitude 9, "
                              "magnitude noise 0.5, increasing ops)") from None
    check_number(options["random_erasing"], "data.random_erasing", minimum=0)
    if options["random_erasing"] > 1:
        raise ConfigError("data.random_erasing", f"is a probability: must be in [0, 1], got "
                          f"{options['random_erasing']!r}")
    if options["interpolation"] not in INTERPOLATIONS:
        raise ConfigError("data.interpolation", f"unknown resampling {options['interpolation']!r}; "
                          f"valid: {', '.join(INTERPOLATIONS)}")
    check_number(options["crop_size"], "data.crop_size", integer=True, minimum=1, optional=True)
    for key in ("randaugment", "random_erasing"):
        if options[key] and not cfg.augment:
            raise ConfigError(f"data.{key}", f"{options[key]!r} adds to the training augmentation, which "
                              "data.augment=false turns off; set data.augment=true, or this key to its off "
                              "value (null / 0)")


def data_info(cfg) -> DataInfo:
    """What the data looks like, from the config alone (nothing is read but, for ImageNet,
    the class folder names). ``num_train`` is 0 where it is not known before loading."""
    name = cfg.name
    if name == "synthetic":
        shape = (cfg.channels, cfg.image_size, cfg.num_classes, cfg.num_train, cfg.num_test)
    elif name == "imagenet":
        train = Path(cfg.root) / "train"
        classes = sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else 1000
        shape = (3, cfg.image_size, classes, 0, 0)
    else:
        shape = SHAPES[name]
    channels, size, classes, num_train, num_test = shape
    if name != "imagenet" and cfg.get("crop_size") is not None:
        size = cfg.crop_size  # the models see the crops
    if cfg.subset is not None and num_train:
        num_train = min(num_train, cfg.subset)
    elif cfg.subset is not None:
        num_train = cfg.subset
    return DataInfo(name, classes, channels, size, num_train, num_test)


def _check_present(cfg) -> None:
    root = Path(cfg.root)
    if cfg.name == "fashion_mnist":
        raw = root / "FashionMNIST" / "raw"
        if not all((raw / f).exists() for f in FASHION_MNIST_FILES) and not all(
            (DEBIAN_FASHION_MNIST / f"{f}.gz").exists() for f in FASHION_MNIST_FILES
        ):
            raise _missing(cfg, "Fashion-MNIST", _FASHION_MNIST_HOW)
    elif cfg.name in ("cifar10", "cifar100"):
        folder = _CIFAR[cfg.name][1]
        if not (root / folder).is_dir():
            raise _missing(cfg, f"{cfg.name.upper()} ({folder}/)", _CIFAR_HOW)
    elif cfg.name == "imagenet":
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            raise _missing(cfg, "ImageNet (train/ and val/ ImageFolder trees)", _IMAGENET_HOW)
        check_image_folders(root)


def check_image_folders(root: Path) -> None:
    """Check an ImageFolder pair ``root/train``, ``root/val`` before anything is read: both
    list the same class folders (labels are numbered by sorted folder name in each tree
    apart, so a class named differently or missing in one shifts every label after it
    without a word), and every class folder holds at least one image file."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = {}
    for split in ("train", "val"):
        classes[split] = sorted(entry.name for entry in os.scandir(root / split) if entry.is_dir())
        if not classes[split]:
            raise ConfigError("data.root", f"{root / split} holds no class folders; an ImageFolder tree is "
                              f"<root>/{split}/<class>/<image> ({_IMAGENET_HOW})")
    only_train = sorted(set(classes["train"]) - set(classes["val"]))
    only_val = sorted(set(classes["val"]) - set(classes["train"]))
    if only_train or only_val:
        raise ConfigError("data.root", f"the class folders of {root / 'val'} differ from those of {root / 'train'}: "
                          f"only in train/: {_some(only_train)}; only in val/: {_some(only_val)}. Labels are "
                          "numbered by sorted folder name in each tree, so the two must list the same classes; "
                          "rename, add or remove class folders until they do")
    empty = [f"{split}/{name}" for split in ("train", "val") for name in classes[split]
             if not _holds_an_image(root / split / name, IMG_EXTENSIONS)]
    if empty:
        raise ConfigError("data.root", f"class folder(s) of {root} with no image file: {_some(empty)} (image files "
                          f"end in {', '.join(IMG_EXTENSIONS)}); add its images, or remove the class from both "
                          "train/ and val/")


def _some(names: list[str], shown: int = 10) -> str:
    """Names for a message: all of them, or the first ``shown`` and how many more."""
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _holds_an_image(folder: Path, extensions: tuple[str, ...]) -> bool:
    """Whether ``folder`` (or a folder below it, as ImageFolder walks them, links followed)
    holds a file ImageFolder would read. Stops at the first one: a class of ImageNet's
    1,300 images costs the first entries of one listing, not the listing."""
    subfolders = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.lower().endswith(extensions) and entry.is_file():
                return True
            if entry.is_dir():
                subfolders.append(Path(entry.path))
    return any(_holds_an_image(sub, extensions) for sub in subfolders)


def build_data(cfg, seed: int = 0, rank: int = 0, world_size: int = 1) -> Data:
    """Build the train and test loaders the config ``data`` section describes.

    ``batch_size`` is the batch of one process; with ``world_size`` processes the global
    batch is ``batch_size * world_size``, and rank ``rank`` loads its slice of it.
    """
    check_data(cfg)
    name = cfg.name
    if name == "imagenet":
        return _imagenet(cfg, seed, rank, world_size)
    if name == "synthetic":
        train_x, train_y, test_x, test_y, num_classes = _synthetic(cfg, seed)
    elif name == "fashion_mnist":
        train_x, train_y, test_x, test_y, num_classes = _fashion_mnist(cfg)
    else:
        train_x, train_y, test_x, test_y, num_classes = _cifar(cfg)
    if cfg.subset is not None:
        if not 0 < cfg.subset <= len(train_y):
            raise ConfigError("data.subset", f"must be in 1..{len(train_y)} or null, got {cfg.subset}")
        train_x, train_y = train_x[: cfg.subset], train_y[: cfg.subset]
    if len(train_y) < cfg.batch_size * world_size:
        raise ConfigError(
            "data.batch_size",
            f"{cfg.batch_size} x {world_size} process(es) is larger than the {len(train_y)} "
            "training images; lower data.batch_size or raise data.subset",
        )
    mean, std = STATS.get(name, (None, None)) if cfg.normalize else (None, None)
    options = augmentation(cfg)
    crop = options["crop_size"]
    info = DataInfo(
        name=name,
        num_classes=num_classes,
        channels=train_x.shape[1],
        image_size=crop or train_x.shape[-1],
        num_train=len(train_y),
        num_test=len(test_y),
    )
    padding = 2 if name == "fashion_mnist" else 4
    policy = options["randaugment"]
    train = TensorLoader(
        train_x, train_y, cfg.batch_size, shuffle=True, drop_last=True, mean=mean, std=std,
        augment=cfg.augment, crop_padding=padding, crop_size=crop,
        randaugment=randaugment_transform(policy, info.image_size, STATS.get(name, (None,))[0],
                                          options["interpolation"]) if cfg.augment and policy else None,
        random_erasing=random_erasing_transform(options["random_erasing"])
        if cfg.augment and options["random_erasing"] else None,
        seed=seed, rank=rank, world_size=world_size,
    )
    test = TensorLoader(
        test_x, test_y, cfg.eval_batch_size, shuffle=False, drop_last=False, mean=mean, std=std,
        crop_size=crop, rank=rank, world_size=world_size,
    )
    return Data(info, train, test)


_FASHION_MNIST_HOW = (
    "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or run once with "
    "data.download=true where the network allows."
)
_CIFAR = {"cifar10": (10, "cifar-10-batches-py"), "cifar100": (100, "cifar-100-python")}
_CIFAR_HOW = (
    "Download the python version from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it "
    "into data.root, or run once with data.download=true where the network allows."
)
_IMAGENET_HOW = "Prepare ILSVRC-2012 as <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG."


def _missing(cfg, what: str, how: str) -> ConfigError:
    return ConfigError(
        "data.root",
        f"{what} not found under data.root={cfg.root!r} (resolved: {Path(cfg.root).resolve()}). "
        f"{how} Then point data.root at it (python train.py data={cfg.name} data.root=/path).",
    )


def _torchvision_splits(dataset_class, cfg, what: str):
    """The train and test splits of a torchvision data set; a missing one is a ConfigError."""
    try:
        return (
            dataset_class(cfg.root, train=True, download=cfg.download),
            dataset_class(cfg.root, train=False, download=cfg.download),
        )
    except RuntimeError as err:
        raise _missing(cfg, what, f"torchvision said: {err}.") from None


def _fashion_mnist(cfg):
    from torchvision.datasets import FashionMNIST

    raw = Path(cfg.root) / "FashionMNIST" / "raw"
    if not all((raw / f).exists() for f in FASHION_MNIST_FILES):
        if all((DEBIAN_FASHION_MNIST / f"{f}.gz").exists() for f in FASHION_MNIST_FILES):
            # Unpack Debian's files once, where torchvision's loader looks for them.
            raw.mkdir(parents=True, exist_ok=True)
            for f in FASHION_MNIST_FILES:
                _unpack_debian_file(DEBIAN_FASHION_MNIST / f"{f}.gz", raw / f)
        elif not cfg.download:
            raise _missing(cfg, "Fashion-MNIST", _FASHION_MNIST_HOW)
    if all((raw / f).exists() for f in FASHION_MNIST_FILES):
        _check_fashion_mnist(raw)
    train, test = _torchvision_splits(FashionMNIST, cfg, "Fashion-MNIST")
    return (
        train.data.unsqueeze(1), train.targets.long(),
        test.data.unsqueeze(1), test.targets.long(), 10,
    )


class DataFileError(ConfigError):
    """A file of a data set that cannot be read as the data set it should be (truncated,
    garbage, the wrong format or shape, an undecodable image). The message names the file,
    what is wrong with it and what to do; regdrop never changes or deletes it."""

    def __init__(self, path: Path | str, problem: str, remedy: str) -> None:
        self.path = Path(path)
        super().__init__(str(path), f"{problem}. {remedy}")


def describe_error(err: BaseException) -> str:
    """A reader's exception on one line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


_REINSTALL_FASHION_MNIST = ("Re-install Debian's package (sudo apt-get install --reinstall "
                            "dataset-fashion-mnist), then run again.")
# IDX files (LeCun's MNIST format, big-endian): magic 0x0000 <type 0x08 = unsigned byte>
# <number of dimensions>, then one 4-byte size per dimension, then the bytes.
_IDX_UBYTE = 0x08
FASHION_MNIST_SIZE = 28


def _unpack_debian_file(packed: Path, target: Path) -> None:
    """Unpack one of Debian's .gz files to ``target``, checked before it is put in place:
    under a private name, then renamed, so parallel jobs never read half a file and a
    damaged source never leaves a damaged copy behind."""
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        with gzip.open(packed, "rb") as source, open(partial, "wb") as unpacked:
            while True:
                try:
                    chunk = source.read(1 << 20)
                except (OSError, EOFError, zlib.error) as err:  # truncated, garbage, not gzip
                    raise DataFileError(packed, f"cannot be unpacked, the file is damaged ({describe_error(err)})",
                                        _REINSTALL_FASHION_MNIST) from None
                if not chunk:
                    break
                unpacked.write(chunk)
        _, problem = _idx_problem(partial, dims=1 if "labels" in target.name else 3)
        if problem:
            raise DataFileError(packed, f"unpacks to a file that {problem}", _REINSTALL_FASHION_MNIST)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _idx_problem(path: Path, dims: int) -> tuple[int, str | None]:
    """The number of items an IDX file of Fashion-MNIST holds, and what is wrong with it
    (None when it is well formed): its magic number, its image size, its length against
    the one its header gives, and for labels (``dims`` 1) the values."""
    size = path.stat().st_size
    header_size = 4 * (dims + 1)
    with open(path, "rb") as f:
        header = f.read(header_size)
    if len(header) < header_size:
        return 0, f"is {size} bytes long, shorter than its IDX header ({header_size} bytes): truncated"
    words = np.frombuffer(header, dtype=">u4")
    expected = (_IDX_UBYTE << 8) | dims
    if words[0] != expected:
        return 0, (f"is not an IDX file of {'labels' if dims == 1 else 'images'}: it starts with 0x{int(words[0]):08x}, "
                   f"not the magic number 0x{expected:08x} (unsigned bytes, {dims} dimension(s))")
    shape = [int(w) for w in words[1:]]
    if dims == 3 and shape[1:] != [FASHION_MNIST_SIZE, FASHION_MNIST_SIZE]:
        return 0, f"holds {shape[1]} x {shape[2]} images; Fashion-MNIST's are 28 x 28"
    promised = header_size + int(np.prod(shape))
    if size != promised:
        return 0, (f"is {size} bytes long, but its header promises {promised} ({' x '.join(map(str, shape))} "
                   f"bytes after the header): {'truncated' if size < promised else 'extra bytes at the end'}")
    if dims == 1:
        labels = np.fromfile(path, dtype=np.uint8, offset=header_size)
        if labels.size and labels.max() > 9:
            return 0, f"holds the label {int(labels.max())}; Fashion-MNIST's labels are 0..9"
    return shape[0], None


def _check_fashion_mnist(raw: Path) -> None:
    """Check the unpacked IDX files before torchvision reads them (its reader stops on a bare
    `AssertionError`, or reshapes a short file without a word)."""
    remedy = ("Delete it: regdrop unpacks it again from Debian's dataset-fashion-mnist package (or "
              "torchvision downloads it with data.download=true), then run again.")
    for split in ("train", "t10k"):
        images, labels = raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"
        counts = []
        for path, dims in ((images, 3), (labels, 1)):
            count, problem = _idx_problem(path, dims)
            if problem:
                raise DataFileError(path, problem, remedy)
            counts.append(count)
        if counts[0] != counts[1]:
            raise DataFileError(images, f"holds {counts[0]} images but {labels.name} beside it holds "
                                f"{counts[1]} labels; one of the two is from another copy",
                                remedy.replace("Delete it", "Delete both"))


def _cifar(cfg):
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if cfg.name == "cifar10" else CIFAR100
    classes, folder = _CIFAR[cfg.name]
    if not cfg.download and not (Path(cfg.root) / folder).is_dir():
        raise _missing(cfg, f"{cfg.name.upper()} ({folder}/)", _CIFAR_HOW)
    try:
        train, test = _torchvision_splits(cls, cfg, cfg.name.upper())
    except Exception:
        # torchvision says "not found or corrupted" (a checksum), or fails inside a pickle
        # or a reshape: name the file and what is wrong with it where one is to blame.
        damage = _cifar_damage(cls, Path(cfg.root) / folder, classes)
        if damage is None:
            raise
        raise _cifar_error(cfg, *damage) from None

    def to_tensor(ds):
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets, dtype=torch.long)

    (train_x, train_y), (test_x, test_y) = to_tensor(train), to_tensor(test)
    if any(len(x) != len(y) or (len(y) and not 0 <= int(y.min()) <= int(y.max()) < classes)
           for x, y in ((train_x, train_y), (test_x, test_y))):
        damage = _cifar_damage(cls, Path(cfg.root) / folder, classes)
        raise _cifar_error(cfg, *(damage or (Path(cfg.root) / folder, "holds labels that do not fit its images")))
    return train_x, train_y, test_x, test_y, classes


def _cifar_error(cfg, path: Path, problem: str) -> DataFileError:
    folder = path if path.is_dir() else path.parent
    return DataFileError(path, problem, f"Delete {folder} and unpack the python version of {cfg.name.upper()} "
                         "there again (https://www.cs.toronto.edu/~kriz/cifar.html), or run once with "
                         "data.download=true where the network allows.")


def _cifar_damage(cls, folder: Path, classes: int) -> tuple[Path, str] | None:
    """The first file of a CIFAR folder that is not what torchvision's ``cls`` expects, and
    what is wrong with it: missing, not a pickle (truncated, garbage), the wrong contents or
    shapes, or a checksum other than the published one. None if every file is sound."""
    from torchvision.datasets.utils import check_integrity

    label_key = "labels" if classes == 10 else "fine_labels"
    listed = [(name, md5, True) for name, md5 in cls.train_list + cls.test_list]
    listed.append((cls.meta["filename"], cls.meta["md5"], False))
    for name, md5, is_batch in listed:
        path = folder / name
        if not path.is_file():
            return path, "is missing"
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
        except Exception as err:  # a damaged pickle raises almost anything
            return path, f"is not a readable pickle: truncated or not a CIFAR file ({describe_error(err)})"
        if not isinstance(entry, dict):
            return path, f"holds a {type(entry).__name__}, not the dict of a CIFAR file"
        if not is_batch:
            if cls.meta["key"] not in entry:
                return path, f"has no {cls.meta['key']!r} entry: not the meta file of this data set"
        else:
            if "data" not in entry or label_key not in entry:
                return path, f"has no 'data' and {label_key!r} entries: not a batch of this data set"
            data, labels = np.asarray(entry["data"]), np.asarray(entry[label_key])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                return path, (f"holds {data.dtype} data of shape {data.shape}; a CIFAR batch holds uint8 rows of "
                              f"3 x 32 x 32 = 3072 pixels")
            if labels.shape != (len(data),):
                return path, f"holds {len(data)} images but {labels.size} labels"
            wrong = labels[(labels < 0) | (labels >= classes)]
            if wrong.size:
                return path, f"holds the label {int(wrong[0])}; valid: 0..{classes - 1}"
        if not check_integrity(str(path), md5):
            return path, "differs from the published file (its md5 checksum): damaged or from another copy"
    return None


def _synthetic(cfg, seed: int):
    generator = stream_generator(seed, "data.synthetic")
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    prototypes = torch.rand((cfg.num_classes, *shape), generator=generator)

    def sample(n: int):
        labels = torch.randint(0, cfg.num_classes, (n,), generator=generator)
        noise = torch.randn((n, *shape), generator=generator) * (cfg.noise / 4)
        images = (prototypes[labels] + noise).clamp_(0, 1).mul_(255).to(torch.uint8)
        return images, labels

    return (*sample(cfg.num_train), *sample(cfg.num_test), cfg.num_classes)


def _imagenet(cfg, seed: int, rank: int = 0, world_size: int = 1) -> Data:
    from torchvision import datasets, transforms

    root = Path(cfg.root)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise _missing(cfg, "ImageNet (train/ and val/ ImageFolder trees)", _IMAGENET_HOW)
    if cfg.download:  # check_data left the tree unchecked (nothing is downloaded for ImageNet)
        check_image_folders(root)
    mean, std = STATS["imagenet"]
    norm = [transforms.Normalize(mean, std)] if cfg.normalize else []
    size = cfg.image_size
    options = augmentation(cfg)
    resample = getattr(transforms.InterpolationMode, options["interpolation"].upper())
    # Resize to size / 0.875 (256 for 224), then the centre crop: the usual evaluation view.
    center = [transforms.Resize(int(size * 8 / 7), interpolation=resample), transforms.CenterCrop(size)]
    if cfg.augment and (options["randaugment"] is not None or options["random_erasing"]):
        # The recipe's pipeline, as timm builds it: random resized crop, flip, RandAugment,
        # tensor, normalise, random erasing (timm leaves colour jitter off under RandAugment).
        from timm.data import create_transform

        train_transform = posterize_to_zero_bits(create_transform(
            size, is_training=True, color_jitter=None,
            auto_augment=options["randaugment"], interpolation=options["interpolation"],
            re_prob=options["random_erasing"], re_mode="pixel", re_count=1,
            mean=mean if cfg.normalize else (0.0,) * 3, std=std if cfg.normalize else (1.0,) * 3,
        ))
    else:
        train_tf = (
            [transforms.RandomResizedCrop(size, interpolation=resample), transforms.RandomHorizontalFlip()]
            if cfg.augment else center
        )
        train_transform = transforms.Compose([*train_tf, transforms.ToTensor(), *norm])
    train_set = CheckedImageFolder(datasets.ImageFolder(root / "train", train_transform))
    test_set = CheckedImageFolder(
        datasets.ImageFolder(root / "val", transforms.Compose([*center, transforms.ToTensor(), *norm]))
    )
    generator = stream_generator(seed, "data.subset")
    if cfg.subset is not None:
        # A seeded random subset: ImageFolder lists files class by class, so the first N
        # would cover only the first classes.
        picked = torch.randperm(len(train_set), generator=generator)[: cfg.subset]
        train_set = torch.utils.data.Subset(train_set, picked.tolist())
    workers = cfg.num_workers
    # Seeded, sharded order: epoch e's permutation depends only on (seed, e), and rank r
    # reads every world_size-th sample of it. `set_epoch` moves it on each epoch.
    sampler = ResumableSampler(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=stream_seed(seed, "data.order"),
        drop_last=True
    )
    on_bad_image = cfg.get("on_bad_image", "stop")
    train = ImageFolderLoader(
        train_set, cfg.batch_size, sampler=sampler, drop_last=True, num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0, generator=generator,
        on_bad_image=on_bad_image, split="train",
    )
    test = ImageFolderLoader(test_set, cfg.eval_batch_size, num_workers=workers,
                             pin_memory=torch.cuda.is_available(), on_bad_image=on_bad_image, split="val")
    info = DataInfo("imagenet", len(test_set.classes), 3, size, len(train_set), len(test_set))
    return Data(info, train, test)


@dataclass(frozen=True)
class BadImage:
    """An image file that could not be decoded, handed on in its sample's place: a
    DataLoader worker never raises for it (torch would re-raise the worker's exception in
    the main process as a traceback inside a RuntimeError)."""

    path: str
    reason: str


class CheckedImageFolder(Dataset):
    """A torchvision ``ImageFolder`` whose images are decoded under watch, inside the
    worker that reads them: an unreadable file (truncated, garbage, not an image) becomes
    a `BadImage` for `ImageFolderLoader` to stop on or skip (``data.on_bad_image``)."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.classes = folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    @property
    def transform(self) -> Callable | None:
        return self.folder.transform

    def __getitem__(self, index: int):
        path, target = self.folder.samples[index]
        try:
            image = self.folder.loader(path)  # PIL open + convert("RGB"): the full decode
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            from PIL import UnidentifiedImageError

            # PIL's own message repeats the path (as a file object's repr): the path is named anyway.
            reason = ("UnidentifiedImageError: not an image format PIL can decode"
                      if isinstance(err, UnidentifiedImageError) else describe_error(err))
            return BadImage(path, reason), target
        if self.folder.transform is not None:
            image = self.folder.transform(image)
        return image, target


def collate_checked(batch: list) -> tuple:
    """torch's ``default_collate`` of a batch's readable samples, and its `BadImage`s apart."""
    bad = [image for image, _ in batch if isinstance(image, BadImage)]
    good = [sample for sample in batch if not isinstance(sample[0], BadImage)]
    images, labels = default_collate(good) if good else (None, None)
    return images, labels, bad


class ImageFolderLoader(DataLoader):
    """The DataLoader of a `CheckedImageFolder`; applies ``data.on_bad_image`` in the main
    process. ``stop``: a `DataFileError` naming the first unreadable image. ``skip``: the
    image is left out of its batch (one sample fewer) and, once per pass over the data, one
    warning says how many were left out (``skipped`` keeps the run's total)."""

    def __init__(self, dataset, *args, on_bad_image: str = "stop", split: str = "train", **kwargs) -> None:
        super().__init__(dataset, *args, collate_fn=collate_checked, **kwargs)
        self.on_bad_image, self.split = on_bad_image, split
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches_left = len(self)  # before the sampler's iter forgets a resumed start
        return self._checked(super().__iter__(), batches_left)

    def _checked(self, batches, batches_left: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skipped: list[BadImage] = []
        try:
            for images, labels, bad in batches:
                batches_left -= 1
                if bad and self.on_bad_image == "stop":
                    raise DataFileError(bad[0].path, f"cannot be decoded as an image ({bad[0].reason})",
                                        "Replace or delete the file, or set data.on_bad_image=skip to leave "
                                        "unreadable images out (they are counted and reported).")
                skipped += bad
                if images is None:
                    raise DataFileError(bad[0].path, f"cannot be decoded ({bad[0].reason}), nor can the other "
                                        f"{len(bad) - 1} image(s) of its batch", "Check the image files under "
                                        "data.root: data.on_bad_image=skip leaves out single images, not whole "
                                        "batches.")
                if batches_left == 0:  # the pass's last batch: report now, not when the loop lets go
                    self._report(skipped)
                    skipped = []
                yield images, labels
        finally:  # a pass cut short (trainer.max_steps, trainer.eval_batches) reports too
            self._report(skipped)

    def _report(self, skipped: list[BadImage]) -> None:
        if not skipped:
            return
        self.skipped += len(skipped)
        first = skipped[0]
        print(f"regdrop: warning: data.on_bad_image=skip: {len(skipped)} unreadable image(s) of {self.split}/ left "
              f"out of this pass ({self.skipped} in all); the first: {first.path} ({first.reason})",
              file=sys.stderr, flush=True)


class ResumableSampler(DistributedSampler):
    """torch's `DistributedSampler` (seeded, sharded, one order per epoch) that can start an
    epoch at a given sample, so a resumed run skips the batches it did without loading them."""

    start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start :]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


def set_epoch(loader: TensorLoader | DataLoader, epoch: int, position: int = 0) -> None:
    """Make ``loader``'s next pass epoch ``epoch`` (its order depends on the epoch alone),
    starting at its batch ``position`` (a resumed run)."""
    if isinstance(loader, TensorLoader):
        loader.set_epoch(epoch, position)
    elif isinstance(getattr(loader, "sampler", None), ResumableSampler):
        loader.sampler.set_epoch(epoch, position * loader.batch_size)
