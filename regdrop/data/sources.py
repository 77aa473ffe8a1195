"""The data sets, read offline: Fashion-MNIST (Debian's package or ``data.root``),
CIFAR-10/100, ImageNet folders and a synthetic set; `build_data` picks the configured one
and builds its loaders. Nothing is downloaded unless ``data.download=true``; a missing
data set stops the run before training with a message naming ``data.root`` and how to
get the data.
"""

from __future__ import annotations

from pathlib import Path

import torch

# The Debian copy is read as checks.DEBIAN_FASHION_MNIST: one name to point elsewhere.
from regdrop.data import checks
from regdrop.data.augment import (
    posterize_to_zero_bits,
    randaugment_transform,
    random_erasing_transform,
)
from regdrop.data.checks import (
    CIFAR_FOLDERS,
    CIFAR_HOW,
    FASHION_MNIST_FILES,
    FASHION_MNIST_HOW,
    IMAGENET_HOW,
    DataInfo,
    augmentation,
    check_data,
    check_fashion_mnist,
    check_image_folders,
    cifar_damage,
    cifar_error,
    missing_data,
    unpack_debian_file,
)
from regdrop.data.loaders import (
    CheckedImageFolder,
    Data,
    ImageFolderLoader,
    ResumableSampler,
    TensorLoader,
)
from regdrop.errors import ConfigError
from regdrop.rng import stream_generator, stream_seed

# Per-channel mean and std of the training sets (0-1 pixel scale).
STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


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


def _torchvision_splits(dataset_class, cfg, what: str):
    """The train and test splits of a torchvision data set; a missing one is a ConfigError."""
    try:
        return (
            dataset_class(cfg.root, train=True, download=cfg.download),
            dataset_class(cfg.root, train=False, download=cfg.download),
        )
    except RuntimeError as err:
        raise missing_data(cfg, what, f"torchvision said: {err}.") from None


def _fashion_mnist(cfg):
    from torchvision.datasets import FashionMNIST

    raw = Path(cfg.root) / "FashionMNIST" / "raw"
    if not all((raw / f).exists() for f in FASHION_MNIST_FILES):
        if all((checks.DEBIAN_FASHION_MNIST / f"{f}.gz").exists() for f in FASHION_MNIST_FILES):
            # Unpack Debian's files once, where torchvision's loader looks for them.
            raw.mkdir(parents=True, exist_ok=True)
            for f in FASHION_MNIST_FILES:
                unpack_debian_file(checks.DEBIAN_FASHION_MNIST / f"{f}.gz", raw / f)
        elif not cfg.download:
            raise missing_data(cfg, "Fashion-MNIST", FASHION_MNIST_HOW)
    if all((raw / f).exists() for f in FASHION_MNIST_FILES):
        check_fashion_mnist(raw)
    train, test = _torchvision_splits(FashionMNIST, cfg, "Fashion-MNIST")
    return (
        train.data.unsqueeze(1), train.targets.long(),
        test.data.unsqueeze(1), test.targets.long(), 10,
    )


def _cifar(cfg):
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if cfg.name == "cifar10" else CIFAR100
    classes, folder = CIFAR_FOLDERS[cfg.name]
    if not cfg.download and not (Path(cfg.root) / folder).is_dir():
        raise missing_data(cfg, f"{cfg.name.upper()} ({folder}/)", CIFAR_HOW)
    try:
        train, test = _torchvision_splits(cls, cfg, cfg.name.upper())
    except Exception:
        # torchvision says "not found or corrupted" (a checksum), or fails inside a pickle
        # or a reshape: name the file and what is wrong with it where one is to blame.
        damage = cifar_damage(cls, Path(cfg.root) / folder, classes)
        if damage is None:
            raise
        raise cifar_error(cfg, *damage) from None

    def to_tensor(ds):
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets, dtype=torch.long)

    (train_x, train_y), (test_x, test_y) = to_tensor(train), to_tensor(test)
    if any(len(x) != len(y) or (len(y) and not 0 <= int(y.min()) <= int(y.max()) < classes)
           for x, y in ((train_x, train_y), (test_x, test_y))):
        damage = cifar_damage(cls, Path(cfg.root) / folder, classes)
        raise cifar_error(cfg, *(damage or (Path(cfg.root) / folder, "holds labels that do not fit its images")))
    return train_x, train_y, test_x, test_y, classes


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
        raise missing_data(cfg, "ImageNet (train/ and val/ ImageFolder trees)", IMAGENET_HOW)
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
