"""Data sets are checked, not trusted: small files in the real formats (IDX and its .gz,
CIFAR pickles, ImageFolder trees of JPEG/PNG), broken the way a crash, a bad copy or a user
would break them. Each fault is one paragraph naming the file (or the classes), exit
status 2, no traceback, and the data files left byte-identical; never a wrong label."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict
from torchvision.datasets import CIFAR10, CIFAR100

import regdrop.data.checks
from regdrop.cli import run
from regdrop.data import build_data
from regdrop.errors import ConfigError
from tests.conftest import TINY, TINY_DATA, TINY_MODELS, compose_config

BASE = [o for o in TINY if o not in TINY_DATA] + TINY_MODELS["lenet"]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def config(tmp_path: Path, data_root: Path, *overrides: str):
    cfg = compose_config([*BASE, *overrides], tmp_path / "run")
    with open_dict(cfg):
        cfg.data.root = str(data_root)
    return cfg


def rejected(cfg, capsys, watched: Path) -> str:
    """Run ``cfg`` as `python train.py` does; it must stop with exit status 2 and one
    paragraph, no traceback, and leave every file under ``watched`` as it was. Returns the
    paragraph without its white space: it is wrapped at 100 columns (a long path stands
    on a line of its own)."""
    before = digest(watched)
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert " ".join(err.split()).startswith("regdrop: error in ") and "Traceback" not in err, err
    assert err.strip().count("\n\n") == 0  # one paragraph
    assert digest(watched) == before
    return squeeze(err)


def squeeze(text: str | Path) -> str:
    return "".join(str(text).split())


# -- Fashion-MNIST: IDX files, packed (Debian's .gz) and unpacked (data.root) ----------------

FASHION_FILES = {"train-images-idx3-ubyte": (3, 48), "train-labels-idx1-ubyte": (1, 48),
                 "t10k-images-idx3-ubyte": (3, 16), "t10k-labels-idx1-ubyte": (1, 16)}


def idx_bytes(name: str) -> bytes:
    """A small, well-formed IDX file of Fashion-MNIST's layout (big-endian header)."""
    dims, count = FASHION_FILES[name]
    rng = np.random.default_rng(len(name))
    shape = (count, 28, 28) if dims == 3 else (count,)
    body = rng.integers(0, 256 if dims == 3 else 10, shape, dtype=np.uint8)
    header = np.array([0x0800 | dims, *shape], dtype=">u4").tobytes()
    return header + body.tobytes()


def write_fashion_mnist(raw: Path, packed: bool = False) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_FILES:
        if packed:
            (raw / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(name)))
        else:
            (raw / name).write_bytes(idx_bytes(name))


def break_file(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "wrong magic":
        path.write_bytes(b"\x00\x00\x08\x03" + data[4:])  # images' magic on a labels file
    elif how == "label 12":
        path.write_bytes(data[:-1] + b"\x0c")
    elif how == "padded":
        path.write_bytes(data + b"\x00" * 100)


FASHION = ["data=fashion_mnist", "data.batch_size=16", "data.eval_batch_size=16"]


@pytest.mark.parametrize("name, how", [
    ("train-images-idx3-ubyte", "truncated"),
    ("t10k-images-idx3-ubyte", "garbage"),
    ("train-labels-idx1-ubyte", "wrong magic"),
    ("t10k-labels-idx1-ubyte", "label 12"),
    ("train-images-idx3-ubyte", "padded"),
])
def test_a_damaged_unpacked_fashion_mnist_file_is_named_with_what_to_do(name, how, tmp_path, capsys, monkeypatch):
    data_root = tmp_path / "data"
    raw = data_root / "FashionMNIST" / "raw"
    write_fashion_mnist(raw)
    break_file(raw / name, how)
    monkeypatch.setattr(regdrop.data.checks, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    message = rejected(config(tmp_path, data_root, *FASHION), capsys, data_root)
    assert message.startswith(squeeze(f"regdrop: error in {raw / name}: "))
    problem = {"truncated": "truncated", "garbage": "not an IDX file", "wrong magic": "magic number",
               "label 12": "the label 12", "padded": "extra bytes"}[how]
    assert squeeze(problem) in message and squeeze("Delete it") in message


def test_fashion_mnist_images_and_labels_that_disagree_are_named(tmp_path, capsys, monkeypatch):
    data_root = tmp_path / "data"
    raw = data_root / "FashionMNIST" / "raw"
    write_fashion_mnist(raw)
    labels = idx_bytes("train-labels-idx1-ubyte")
    (raw / "train-labels-idx1-ubyte").write_bytes(labels[:4] + np.array([40], ">u4").tobytes() + labels[8:48])
    monkeypatch.setattr(regdrop.data.checks, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    message = rejected(config(tmp_path, data_root, *FASHION), capsys, data_root)
    assert squeeze("holds 48 images but train-labels-idx1-ubyte beside it holds 40 labels") in message


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_debian_fashion_mnist_file_is_named_and_leaves_no_copy(how, tmp_path, capsys, monkeypatch):
    debian, data_root = tmp_path / "debian", tmp_path / "data"
    write_fashion_mnist(debian, packed=True)
    break_file(debian / "t10k-images-idx3-ubyte.gz", how)
    monkeypatch.setattr(regdrop.data.checks, "DEBIAN_FASHION_MNIST", debian)
    message = rejected(config(tmp_path, data_root, *FASHION), capsys, debian)
    assert message.startswith(squeeze(f"regdrop: error in {debian / 't10k-images-idx3-ubyte.gz'}: "))
    assert squeeze("apt-get install --reinstall dataset-fashion-mnist") in message
    raw = data_root / "FashionMNIST" / "raw"
    assert not (raw / "t10k-images-idx3-ubyte").exists()  # no damaged copy where a good one belongs
    assert not list(raw.glob("*.partial"))  # and no half-written file


def test_the_way_forward_from_a_damaged_copy_works_delete_it_and_it_is_unpacked_again(tmp_path, capsys,
                                                                                      monkeypatch):
    debian, data_root = tmp_path / "debian", tmp_path / "data"
    write_fashion_mnist(debian, packed=True)
    monkeypatch.setattr(regdrop.data.checks, "DEBIAN_FASHION_MNIST", debian)
    cfg = config(tmp_path, data_root, *FASHION)
    unpacked = build_data(cfg.data).info  # unpacked from the "Debian" files and read
    assert (unpacked.num_train, unpacked.num_test) == (48, 16)
    damaged = data_root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    break_file(damaged, "truncated")
    assert squeeze("Delete it") in rejected(cfg, capsys, data_root)
    damaged.unlink()
    data = build_data(cfg.data)
    assert data.info.num_train == 48 and damaged.read_bytes() == idx_bytes(damaged.name)


# -- CIFAR-10/100: the python version's pickles, checked by torchvision's own checksums ------


def write_cifar(root: Path, cls, monkeypatch) -> Path:
    """Small files in CIFAR's real pickle format; torchvision's list of published checksums
    is pointed at them, so its real integrity check passes on these files as written."""
    cifar10 = cls is CIFAR10
    folder = root / ("cifar-10-batches-py" if cifar10 else "cifar-100-python")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key, classes = ("labels", 10) if cifar10 else ("fine_labels", 100)

    def write(name: str, entry: dict) -> list[str]:
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        return [name, hashlib.md5((folder / name).read_bytes()).hexdigest()]

    def batch(name: str, n: int) -> list[str]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        return write(name, {"data": data, label_key: [int(v) for v in rng.integers(0, classes, n)]})

    train_names = [f"data_batch_{i}" for i in range(1, 6)] if cifar10 else ["train"]
    monkeypatch.setattr(cls, "train_list", [batch(name, 20 // len(train_names)) for name in train_names])
    monkeypatch.setattr(cls, "test_list", [batch("test_batch" if cifar10 else "test", 10)])
    meta_name, md5 = write(cls.meta["filename"], {cls.meta["key"]: [f"c{i}" for i in range(classes)]})
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5})
    return folder


@pytest.mark.parametrize("cls, name, how, expected", [
    (CIFAR10, "data_batch_3", "truncated", "not a readable pickle"),
    (CIFAR10, "test_batch", "garbage", "not a readable pickle"),
    (CIFAR10, "data_batch_2", "wrong shape", "3072 pixels"),
    (CIFAR10, "data_batch_5", "label 10", "label 10; valid: 0..9"),
    (CIFAR10, "batches.meta", "truncated", "not a readable pickle"),
    (CIFAR100, "train", "truncated", "not a readable pickle"),
])
def test_a_damaged_cifar_file_is_named_with_what_to_do(cls, name, how, expected, tmp_path, capsys, monkeypatch):
    data_root = tmp_path / "data"
    folder = write_cifar(data_root, cls, monkeypatch)
    data_option = "data=cifar10" if cls is CIFAR10 else "data=cifar100"
    cfg = config(tmp_path, data_root, data_option, "data.batch_size=4", "data.eval_batch_size=4")
    assert build_data(cfg.data).info.num_train == 20  # sound as written: the real checks pass
    path = folder / name
    if how in ("wrong shape", "label 10"):
        with open(path, "rb") as f:
            entry = pickle.load(f)
        if how == "wrong shape":
            entry["data"] = entry["data"][:, :3000]
        else:
            entry["labels"][-1] = 10
        with open(path, "wb") as f:
            pickle.dump(entry, f)
    else:
        break_file(path, how)
    message = rejected(cfg, capsys, data_root)
    assert message.startswith(squeeze(f"regdrop: error in {path}: ")) and squeeze(expected) in message
    assert squeeze(f"Delete {folder}") in message


def test_a_cifar_file_altered_but_readable_fails_its_checksum_and_is_named(tmp_path, capsys, monkeypatch):
    data_root = tmp_path / "data"
    folder = write_cifar(data_root, CIFAR10, monkeypatch)
    path = folder / "data_batch_4"
    with open(path, "rb") as f:
        entry = pickle.load(f)
    entry["data"][0, 0] ^= 1  # one pixel changed: sound in form, not the published file
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    message = rejected(config(tmp_path, data_root, "data=cifar10", "data.batch_size=4"), capsys, data_root)
    assert message.startswith(squeeze(f"regdrop: error in {path}: ")) and squeeze("md5 checksum") in message


# -- ImageFolder: class folders of train/ and val/, unreadable images -----------------------

CLASSES = ("n01440764", "n02102040", "n03000134")


def write_image_folder(root: Path, train: int = 4, val: int = 2) -> None:
    """A three-class ImageFolder tree of small JPEGs in ImageNet's layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for wnid in CLASSES:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", format="JPEG")


IMAGENET = ["data=imagenet", "data.image_size=32", "data.batch_size=4", "data.eval_batch_size=4",
            "data.num_workers=0"]


def test_val_classes_named_differently_from_trains_are_an_error_naming_both(tmp_path, capsys):
    """Before this check the run trained and reported an accuracy on shifted labels."""
    data_root = tmp_path / "imagenet"
    write_image_folder(data_root)
    (data_root / "val" / "n03000134").rename(data_root / "val" / "n99000134")
    message = rejected(config(tmp_path, data_root, *IMAGENET), capsys, data_root)
    assert message.startswith(squeeze("regdrop: error in data.root: "))
    assert squeeze("only in train/: n03000134; only in val/: n99000134") in message


def test_a_class_missing_from_val_is_an_error_naming_it(tmp_path, capsys):
    """Before this check: IndexError, Target 2 is out of bounds."""
    data_root = tmp_path / "imagenet"
    write_image_folder(data_root)
    shutil.rmtree(data_root / "val" / "n02102040")
    cfg = config(tmp_path, data_root, *IMAGENET)
    message = rejected(cfg, capsys, data_root)
    assert squeeze("only in train/: n02102040; only in val/: none") in message
    with open_dict(cfg):
        cfg.data.download = True  # skips the check for a data set's presence, not this one
    with pytest.raises(ConfigError, match="only in train/: n02102040"):
        build_data(cfg.data)


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path, capsys):
    data_root = tmp_path / "imagenet"
    write_image_folder(data_root)
    for image in (data_root / "train" / "n02102040").iterdir():
        image.unlink()
    message = rejected(config(tmp_path, data_root, *IMAGENET), capsys, data_root)
    assert squeeze("with no image file: train/n02102040 (image files end in .jpg") in message


def break_image(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(b"not an image at all" * 20)


@pytest.mark.parametrize("split, how, workers", [("train", "truncated", 1), ("val", "garbage", 0)])
def test_an_unreadable_image_stops_the_run_naming_the_file_by_default(split, how, workers, tmp_path, capsys):
    """Decoded inside a DataLoader worker too: the worker hands the fault on, no traceback."""
    data_root = tmp_path / "imagenet"
    write_image_folder(data_root)
    bad = data_root / split / CLASSES[1] / f"{CLASSES[1]}_0.JPEG"
    break_image(bad, how)
    cfg = config(tmp_path, data_root, *IMAGENET, f"data.num_workers={workers}", "trainer.max_steps=3",
                 "trainer.epochs=1", "trainer.eval_batches=null")
    message = rejected(cfg, capsys, data_root)
    assert message.startswith(squeeze(f"regdrop: error in {bad}: cannot be decoded as an image"))
    assert squeeze("data.on_bad_image=skip") in message


def test_on_bad_image_skip_leaves_the_images_out_counts_them_and_finishes(tmp_path, capsys):
    data_root = tmp_path / "imagenet"
    write_image_folder(data_root)
    for name in (f"{CLASSES[0]}_1.JPEG", f"{CLASSES[2]}_3.JPEG"):
        break_image(data_root / "train" / name.split("_")[0] / name, "truncated")
    break_image(data_root / "val" / CLASSES[1] / f"{CLASSES[1]}_1.JPEG", "garbage")
    cfg = config(tmp_path, data_root, *IMAGENET, "data.on_bad_image=skip", "data.num_workers=1",
                 "trainer.max_steps=3", "trainer.epochs=1", "trainer.eval_batches=null")
    before = digest(data_root)
    metrics = run(cfg)
    err = capsys.readouterr().err
    assert metrics is not None and "Traceback" not in err
    # One warning per pass over the data, with its count: 3 training batches hold all 12 images.
    assert err.count("unreadable image(s) of train/") == 1
    assert "2 unreadable image(s) of train/ left out of this pass (2 in all)" in err
    assert "1 unreadable image(s) of val/ left out of this pass (1 in all)" in err
    assert digest(data_root) == before


def test_the_skipped_images_are_left_out_of_their_batches_and_counted(tmp_path):
    data_root = tmp_path / "imagenet"
    write_image_folder(data_root)
    break_image(data_root / "train" / CLASSES[0] / f"{CLASSES[0]}_2.JPEG", "garbage")
    cfg = config(tmp_path, data_root, *IMAGENET, "data.on_bad_image=skip", "data.augment=false")
    data = build_data(cfg.data)
    sizes = [len(y) for _, y in data.train]
    assert sorted(sizes) == [3, 4, 4] and data.train.skipped == 1
    assert [len(y) for _, y in data.test] == [4, 2] and data.test.skipped == 0
