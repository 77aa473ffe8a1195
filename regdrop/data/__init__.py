"""Data sets: real ones read offline (Fashion-MNIST, CIFAR-10/100, ImageNet) and synthetic.

Small data sets that fit in memory (Fashion-MNIST, CIFAR, synthetic) take a fast tensor
path: the whole set is held as one uint8 tensor and batches are sliced, normalised and
augmented on the fly with vectorised tensor ops, instead of decoding a PIL image per
sample per epoch. ImageNet goes through torchvision's ImageFolder and DataLoader workers.

The package, in the order its modules import one another:

* `regdrop.data.augment`: the in-memory augmentations;
* `regdrop.data.checks`: the data section's checks and the data files' checks (a message
  naming the key or file and what to do), and `DataInfo`;
* `regdrop.data.loaders`: `TensorLoader`, the ImageFolder loader, the resumable sampler
  and `set_epoch` (a resumed run reads on from its place in the epoch);
* `regdrop.data.sources`: the data sets and `build_data`.

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
"""

from regdrop.data.augment import (
    center_crop,
    posterize_to_zero_bits,
    rand_augment_batch,
    randaugment_transform,
    random_crop_flip,
    random_erasing_transform,
)
from regdrop.data.checks import (
    DATA_KEYS,
    DATASETS,
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_FILES,
    DataFileError,
    DataInfo,
    augmentation,
    check_data,
    check_image_folders,
    data_info,
    describe_error,
)
from regdrop.data.loaders import (
    Data,
    ImageFolderLoader,
    ResumableSampler,
    TensorLoader,
    set_epoch,
)
from regdrop.data.sources import STATS, build_data

__all__ = [
    "DATASETS", "DATA_KEYS", "DEBIAN_FASHION_MNIST", "FASHION_MNIST_FILES", "STATS", "Data", "DataFileError",
    "DataInfo", "ImageFolderLoader", "ResumableSampler", "TensorLoader", "augmentation", "build_data",
    "center_crop", "check_data", "check_image_folders", "data_info", "describe_error", "posterize_to_zero_bits",
    "rand_augment_batch", "randaugment_transform", "random_crop_flip", "random_erasing_transform", "set_epoch",
]
