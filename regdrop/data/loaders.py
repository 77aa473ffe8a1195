"""The loaders and their place in an epoch, so that a resumed run reads on from where it
stopped: `TensorLoader` (an in-memory uint8 tensor, batches sliced, normalised and
augmented on the fly), `ImageFolderLoader` (torchvision's DataLoader over an ImageFolder,
with an image that cannot be decoded stopped on or skipped and counted:
``data.on_bad_image``), `ResumableSampler` and `set_epoch`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from regdrop.data.augment import center_crop, rand_augment_batch, random_crop_flip
from regdrop.data.checks import DataFileError, DataInfo, describe_error
from regdrop.rng import seeded_global_state, stream_generator, stream_seed


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
    restores its position (`set_epoch`: epoch and batch) without replaying the
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
