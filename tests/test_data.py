"""Data loading: the in-memory tensor path, real Fashion-MNIST, CIFAR in its real format."""

import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from omegaconf import OmegaConf
from torchvision.datasets import CIFAR10

from regdrop.data import TensorLoader, build_data, random_crop_flip
from regdrop.errors import ConfigError
from tests.conftest import FASHION_MNIST_INSTALLED


def data_cfg(**overrides):
    """A ``data`` section: the keys every data set has, plus synthetic's own for synthetic."""
    base = dict(name="synthetic", root="unused", download=False, batch_size=8, eval_batch_size=16,
                num_workers=0, subset=None, augment=False, normalize=False)
    if overrides.get("name", "synthetic") == "synthetic":
        base.update(channels=3, image_size=8, num_classes=4, num_train=40, num_test=20, noise=1.0)
    return OmegaConf.create({**base, **overrides})


def test_tensor_loader_covers_every_sample_once_per_epoch_and_drops_the_remainder():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    loader = TensorLoader(images, torch.arange(10), 3, shuffle=True, drop_last=True, mean=None, std=None)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    seen = torch.cat([y for _, y in batches])
    assert len(seen.unique()) == 9  # 3 full batches of distinct samples, remainder dropped
    for x, y in batches:  # images stay paired with their labels
        assert torch.equal((x[:, 0, 0, 0] * 255).round().long(), y)


def test_tensor_loader_order_is_reproducible_from_its_seed():
    images = torch.zeros(20, 1, 2, 2, dtype=torch.uint8)
    def order(seed):
        loader = TensorLoader(images, torch.arange(20), 5, shuffle=True, drop_last=True, mean=None, std=None, seed=seed)
        return torch.cat([y for _, y in loader])
    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))


def test_random_crop_flip_moves_pixels_without_inventing_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    out = random_crop_flip(x, 2, g)
    assert out.shape == x.shape
    # every output pixel is an input pixel of the same image and channel or padding zero
    for i in range(4):
        values = set(x[i].flatten().tolist()) | {0.0}
        assert set(out[i].flatten().tolist()) <= values
    assert not torch.equal(out, x)
    # Some images are flipped: with zero shift, out equals x or x flipped.
    flipped = random_crop_flip(x, 0, torch.Generator().manual_seed(1))
    is_flipped = (flipped == x.flip(-1)).flatten(1).all(1)
    is_same = (flipped == x).flatten(1).all(1)
    assert torch.all(is_flipped | is_same) and 10 < is_flipped.sum() < 54


def test_synthetic_data_has_the_configured_shape_and_is_learnable_by_prototype():
    data = build_data(data_cfg())
    assert data.info.channels == 3 and data.info.image_size == 8 and data.info.num_classes == 4
    x, y = next(iter(data.test))
    assert x.shape == (16, 3, 8, 8) and y.max() < 4
    # nearest class mean classifies most test samples: the labels depend on the inputs
    batches = list(data.train)
    train_x = torch.cat([b for b, _ in batches])
    train_y = torch.cat([t for _, t in batches])
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(4)])
    predicted = torch.cdist(x.flatten(1), means.flatten(1)).argmin(1)
    assert (predicted == y).float().mean() > 0.9


def test_subset_and_batch_size_are_checked():
    assert build_data(data_cfg(subset=16)).info.num_train == 16
    with pytest.raises(ConfigError) as err:
        build_data(data_cfg(subset=1000))
    assert err.value.key == "data.subset"
    with pytest.raises(ConfigError) as err:
        build_data(data_cfg(batch_size=100))
    assert err.value.key == "data.batch_size"


@pytest.mark.skipif(not FASHION_MNIST_INSTALLED, reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_is_read_from_the_debian_files(tmp_path):
    cfg = data_cfg(name="fashion_mnist", root=str(tmp_path), normalize=True, batch_size=128)
    data = build_data(cfg)
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
    assert (data.info.num_train, data.info.num_test, data.info.channels, data.info.image_size) == (60000, 10000, 1, 28)
    assert len(data.train) == 60000 // 128
    labels = torch.cat([y for _, y in data.test])
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))  # the real test split
    x, _ = next(iter(data.train))
    assert abs(x.mean().item()) < 0.2 and abs(x.std().item() - 1) < 0.2  # normalised


def write_fake_cifar10(root, n_train=20, n_test=10):
    """Small files in CIFAR-10's real python pickle format."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    def batch(name, n):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [int(v) for v in rng.integers(0, 10, n)]}, f)
    for i in range(1, 6):
        batch(f"data_batch_{i}", n_train // 5)
    batch("test_batch", n_test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_goes_through_torchvisions_real_loader(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path)
    # Our small files cannot match the md5 sums torchvision checks; everything else is real.
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    data = build_data(data_cfg(name="cifar10", root=str(tmp_path), augment=True, normalize=True, batch_size=4))
    assert (data.info.num_train, data.info.num_test, data.info.channels, data.info.image_size, data.info.num_classes) == (20, 10, 3, 32, 10)
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet"])
def test_missing_data_names_data_root(tmp_path, name):
    with pytest.raises(ConfigError) as err:
        extra = {"image_size": 224} if name == "imagenet" else {}
        build_data(data_cfg(name=name, root=str(tmp_path / "nowhere"), **extra))
    assert err.value.key == "data.root"
    assert "data.root" in str(err.value)


def test_imagenet_reads_an_image_folder_tree(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for wnid in ("n01440764", "n01443537"):
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", format="JPEG")
    cfg = data_cfg(name="imagenet", root=str(tmp_path), image_size=32, batch_size=4, eval_batch_size=4,
                   augment=True, normalize=True)
    data = build_data(cfg)
    assert (data.info.num_classes, data.info.num_train, data.info.num_test, data.info.image_size) == (2, 12, 4, 32)
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 1}
    x, y = next(iter(data.test))
    assert x.shape == (4, 3, 32, 32)
