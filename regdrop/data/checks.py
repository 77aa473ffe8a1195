"""The data section's checks and the data files' checks, each failure a message naming the
key or the file, what is valid and what to do.

A config is checked (`check_data`) before anything is read: its keys, the augmentation
options, the shapes a model needs (`data_info`, without reading the data) and that the
data is present. Data sets are checked, not trusted: a damaged Fashion-MNIST IDX file
(Debian's .gz or the copy unpacked under ``data.root``) or CIFAR pickle is a
`DataFileError` naming the file, what is wrong and what to do; an ImageFolder pair whose
``val/`` classes differ from ``train/``'s, or with an empty class folder, is refused
before anything is read (labels are numbered by folder, so it would train on wrong
labels).
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from regdrop.data.augment import randaugment_transform
from regdrop.errors import ConfigError, check_keys, check_number

# Where Debian's dataset-fashion-mnist package puts the original IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


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
            raise missing_data(cfg, "Fashion-MNIST", FASHION_MNIST_HOW)
    elif cfg.name in ("cifar10", "cifar100"):
        folder = CIFAR_FOLDERS[cfg.name][1]
        if not (root / folder).is_dir():
            raise missing_data(cfg, f"{cfg.name.upper()} ({folder}/)", CIFAR_HOW)
    elif cfg.name == "imagenet":
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            raise missing_data(cfg, "ImageNet (train/ and val/ ImageFolder trees)", IMAGENET_HOW)
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
                              f"<root>/{split}/<class>/<image> ({IMAGENET_HOW})")
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


FASHION_MNIST_HOW = (
    "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or run once with "
    "data.download=true where the network allows."
)


CIFAR_FOLDERS = {"cifar10": (10, "cifar-10-batches-py"), "cifar100": (100, "cifar-100-python")}


CIFAR_HOW = (
    "Download the python version from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it "
    "into data.root, or run once with data.download=true where the network allows."
)


IMAGENET_HOW = "Prepare ILSVRC-2012 as <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG."


def missing_data(cfg, what: str, how: str) -> ConfigError:
    return ConfigError(
        "data.root",
        f"{what} not found under data.root={cfg.root!r} (resolved: {Path(cfg.root).resolve()}). "
        f"{how} Then point data.root at it (python train.py data={cfg.name} data.root=/path).",
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


def unpack_debian_file(packed: Path, target: Path) -> None:
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


def check_fashion_mnist(raw: Path) -> None:
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


def cifar_error(cfg, path: Path, problem: str) -> DataFileError:
    folder = path if path.is_dir() else path.parent
    return DataFileError(path, problem, f"Delete {folder} and unpack the python version of {cfg.name.upper()} "
                         "there again (https://www.cs.toronto.edu/~kriz/cifar.html), or run once with "
                         "data.download=true where the network allows.")


def cifar_damage(cls, folder: Path, classes: int) -> tuple[Path, str] | None:
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
