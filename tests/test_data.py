"""Data loading: the in-memory tensor path, real Fashion-MNIST, CIFAR in its real format."""

import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from omegaconf import OmegaConf
from torchvision.datasets import CIFAR10

from regdrop.data import (
    TensorLoader,
    build_data,
    center_crop,
    rand_augment_batch,
    randaugment_transform,
    random_crop_flip,
    random_erasing_transform,
)
from regdrop.errors import ConfigError
from regdrop.rng import seeded_global_state
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


def write_image_folder(root):
    """A two-class ImageFolder tree of small JPEGs in ImageNet's layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for wnid in ("n01440764", "n01443537"):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", format="JPEG")


def test_imagenet_reads_an_image_folder_tree(tmp_path):
    write_image_folder(tmp_path)
    cfg = data_cfg(name="imagenet", root=str(tmp_path), image_size=32, batch_size=4, eval_batch_size=4,
                   augment=True, normalize=True)
    data = build_data(cfg)
    assert (data.info.num_classes, data.info.num_train, data.info.num_test, data.info.image_size) == (2, 12, 4, 32)
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 1}
    x, y = next(iter(data.test))
    assert x.shape == (4, 3, 32, 32)


# -- the recipes' augmentation ---------------------------------------------------------------


def coded_images(n: int, size: int = 32) -> torch.Tensor:
    """uint8 images whose pixel (c, i, j) codes its own position and image, so a crop's
    offset can be read back: channel 0 = row, 1 = column, 2 = image index (mod 256)."""
    rows = torch.arange(size).view(size, 1).expand(size, size)
    cols = torch.arange(size).view(1, size).expand(size, size)
    return torch.stack([torch.stack([rows, cols, torch.full((size, size), k % 256)]) for k in range(n)]).to(torch.uint8)


def test_24px_crops_train_on_random_windows_and_test_on_the_centre():
    """The Gyro authors' CIFAR pipeline: random 24 x 24 windows of the 32 px image (no
    padding) with flips in training, the centre window at test time; the model sees 24 px."""
    images = coded_images(400)
    train = TensorLoader(images, torch.arange(400), 400, shuffle=False, drop_last=True, mean=None, std=None,
                         augment=True, crop_size=24, seed=1)
    x = (next(iter(train))[0] * 255).round().long()
    assert x.shape == (400, 3, 24, 24)
    top, left = x[:, 0, 0, :].min(1).values, x[:, 1, 0, :].min(1).values
    flipped = x[:, 1, 0, 0] > x[:, 1, 0, -1]
    for k in range(400):  # each image is one window of itself, whole rows and columns, maybe mirrored
        rows = torch.arange(top[k], top[k] + 24).view(24, 1).expand(24, 24)
        cols = torch.arange(left[k], left[k] + 24).view(1, 24).expand(24, 24)
        assert torch.equal(x[k, 0], rows) and torch.equal(x[k, 1], cols.flip(-1) if flipped[k] else cols)
        assert int(x[k, 2, 0, 0]) == k % 256
    # Every offset 0..8 occurs, about as often (400 draws over 9 values: 44 expected each).
    assert torch.bincount(top, minlength=9).min() > 20 and torch.bincount(left, minlength=9).min() > 20
    assert 0.4 < flipped.float().mean() < 0.6
    test = TensorLoader(images, torch.arange(400), 10, shuffle=False, drop_last=False, mean=None, std=None,
                        crop_size=24)
    x = (next(iter(test))[0] * 255).round().long()
    assert torch.equal(x[:, :2], images[:10, :2, 4:28, 4:28].long())  # TF: offset (32 - 24) // 2
    assert torch.equal(center_crop(images[:1], 24), images[:1, :, 4:28, 4:28])


def test_crop_size_reaches_the_models_input_and_is_checked(tmp_path):
    data = build_data(data_cfg(image_size=32, crop_size=24, augment=True))
    assert data.info.image_size == 24 and next(iter(data.train))[0].shape[-1] == 24
    assert next(iter(data.test))[0].shape[-1] == 24
    with pytest.raises(ConfigError) as err:
        build_data(data_cfg(image_size=16, crop_size=24))
    assert err.value.key == "data.crop_size"


def test_randaugment_is_timms_policy_per_image_and_a_function_of_the_batchs_place():
    images = (torch.rand(64, 3, 32, 32) * 255).to(torch.uint8)
    def loader(seed, policy="rand-m9-mstd0.5-inc1"):
        transform = randaugment_transform(policy, 32, (0.49, 0.48, 0.45), "bicubic")
        return TensorLoader(images, torch.arange(64), 16, shuffle=True, drop_last=True, mean=None, std=None,
                            augment=True, crop_padding=0, randaugment=transform, seed=seed)
    plain = TensorLoader(images, torch.arange(64), 16, shuffle=True, drop_last=True, mean=None, std=None,
                         augment=True, crop_padding=0, seed=3)
    augmented = list(loader(3))
    changed = []
    for (a, ya), (p, yp) in zip(augmented, plain, strict=True):
        assert torch.equal(ya, yp)  # the same samples, crops and flips; RandAugment on top
        changed += (a != p).flatten(1).any(1).tolist()
        assert not torch.equal(a[0] - p[0], a[1] - p[1])  # each image draws its own ops
    # timm applies each of its 2 ops with probability 0.5: 3 images in 4 get at least one.
    assert 0.5 < np.mean(changed) < 0.95
    # A pure function of (seed, epoch, batch): a loader resumed at batch 2 gives batch 2 again,
    # and the global generators are left as they were.
    np.random.seed(5)
    state = np.random.get_state()[1].copy()
    resumed = loader(3)
    resumed.set_epoch(0, 2)
    assert torch.equal(next(iter(resumed))[0], augmented[2][0])
    assert np.array_equal(np.random.get_state()[1], state)
    assert not torch.equal(next(iter(loader(4)))[0], augmented[0][0])
    # Grey images (Fashion-MNIST) take the same ops.
    grey = rand_augment_batch(images[:8, :1], randaugment_transform("rand-m9-mstd0.5-inc1", 32, (0.29,)))
    assert grey.shape == (8, 1, 32, 32) and grey.dtype == torch.uint8


def test_randaugment_survives_its_strongest_posterize():
    """Magnitude noise takes m9 to 10, where timm's increasing posterize keeps 0 bits: a
    black image, never an error from PIL."""
    from timm.data.auto_augment import RandAugment

    transform = randaugment_transform("rand-m10-n1-mstd0-inc1", 8, None)
    assert isinstance(transform, RandAugment)
    transform.ops = [op for op in transform.ops if op.name == "PosterizeIncreasing"]
    transform.ops[0].prob = 1.0
    out = rand_augment_batch(torch.full((2, 3, 8, 8), 200, dtype=torch.uint8), transform)
    assert int(out.max()) == 0


@pytest.mark.parametrize("policy", ["rand-m9-zz1", "auto", "v0", 7])
def test_a_bad_randaugment_policy_names_its_key(policy):
    with pytest.raises(ConfigError) as err:
        build_data(data_cfg(augment=True, randaugment=policy))
    assert err.value.key == "data.randaugment"


def test_randaugment_and_erasing_need_augment_on():
    for key, on in (("randaugment", "rand-m9-mstd0.5-inc1"), ("random_erasing", 0.25)):
        with pytest.raises(ConfigError) as err:
            build_data(data_cfg(augment=False, **{key: on}))
        assert err.value.key == f"data.{key}"


def test_random_erasing_fills_one_box_per_erased_image_with_noise_at_its_probability():
    x = torch.zeros(400, 3, 32, 32)
    with seeded_global_state(0):
        erased = random_erasing_transform(0.25)(x.clone())
    hit = (erased != 0).flatten(1).any(1)
    # probability 0.25: 100 of 400 expected, binomial sd 8.7
    assert abs(int(hit.sum()) - 100) < 35
    for k in hit.nonzero().flatten().tolist():
        box = (erased[k] != 0).any(0)
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one solid box
        area = box.float().mean()
        assert 0.02 <= area <= 1 / 3 + 0.02  # timm's areas, rounded to whole pixels
        values = erased[k][:, box]
        assert abs(float(values.mean())) < 0.5 and 0.5 < float(values.std()) < 1.5  # per-pixel N(0, 1)
    # In the loader: on the normalised batch, seeded per batch like the other streams.
    images = (torch.rand(32, 3, 16, 16) * 255).to(torch.uint8)
    def batches(seed):
        return list(TensorLoader(images, torch.arange(32), 16, shuffle=False, drop_last=True, mean=(0.5,) * 3,
                                 std=(0.25,) * 3, augment=True, crop_padding=0,
                                 random_erasing=random_erasing_transform(1.0), seed=seed))
    a, b = batches(1), batches(1)
    assert torch.equal(a[1][0], b[1][0]) and not torch.equal(a[1][0], batches(2)[1][0])


def test_imagenet_takes_timms_recipe_pipeline(tmp_path):
    """RandAugment and random erasing on the ImageFolder path: timm's create_transform, as
    the early-dropout code builds it, with bicubic resampling for the evaluation resize."""
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms

    write_image_folder(tmp_path)
    cfg = data_cfg(name="imagenet", root=str(tmp_path), image_size=32, batch_size=4, eval_batch_size=4,
                   augment=True, normalize=True, randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.25,
                   interpolation="bicubic")
    data = build_data(cfg)
    steps = data.train.dataset.transform.transforms
    assert any(isinstance(t, RandAugment) for t in steps) and any(isinstance(t, RandomErasing) for t in steps)
    assert not any(isinstance(t, transforms.ColorJitter) for t in steps)  # off under RandAugment, as timm has it
    resize = data.test.dataset.transform.transforms[0]
    assert resize.interpolation == transforms.InterpolationMode.BICUBIC and resize.size == 36
    x, _ = next(iter(data.train))
    assert x.shape == (4, 3, 32, 32)
