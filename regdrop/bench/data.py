"""How much of a training epoch waits for data: the in-memory Fashion-MNIST loader, and an
ImageFolder tree of JPEG files decoded by DataLoader workers.

Each case trains real steps (`regdrop.train.train_step`, the default LeNet with standard
dropout) from the real loader, whose iterator is wrapped to clock every ``next``. The wait
fraction is the time spent inside ``next`` over the epoch's wall time. On an accelerator
the step only queues work, so the loader's time is host time that the device may hide;
the epoch's wall time ends with a device synchronisation.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from regdrop import train as training
from regdrop.bench.steps import config, step_parts
from regdrop.bench.timing import synchronizer
from regdrop.data import DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES, build_data, set_epoch
from regdrop.methods import apply_method
from regdrop.models import build_model
from regdrop.runtime import Runtime


class ClockedIterator:
    """An iterator that adds the seconds spent in each ``next`` of ``inner`` to ``waited``."""

    def __init__(self, inner: Iterator) -> None:
        self.inner = inner
        self.waited = 0.0
        self.batches = 0

    def __iter__(self) -> ClockedIterator:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.inner)
        finally:
            self.waited += time.perf_counter() - start
            self.batches += 1


def _parts(model_name: str, info, runtime: Runtime, **options) -> training.StepParts:
    """The model (conf/model/<name>.yaml with ``options``) with the default method
    (``dropout=standard``), ready for `regdrop.train.train_step`."""
    torch.manual_seed(0)
    model = build_model(config("model", model_name, **options), info)
    apply_method(model, config("dropout", "standard"))
    model.to(runtime.device).train()
    return step_parts(model, model, runtime)


def timed_epoch(parts: training.StepParts, loader, epoch: int, max_steps: int | None
                ) -> dict:
    """Train one epoch of ``loader`` (its first ``max_steps`` steps if given); the time spent
    waiting for batches and the wall time."""
    sync = synchronizer(parts.runtime.device)
    set_epoch(loader, epoch)
    sync()
    start = time.perf_counter()
    batches = ClockedIterator(iter(loader))
    steps = len(loader) if max_steps is None else min(max_steps, len(loader))
    for step in range(steps):
        training.train_step(parts, batches, step, 1.0)
    sync()
    wall = time.perf_counter() - start
    return {"steps": steps, "wall_s": wall, "wait_s": batches.waited,
            "wait_fraction": batches.waited / wall}


def fashion_mnist_installed(root: Path) -> bool:
    raw = root / "FashionMNIST" / "raw"
    return all((raw / f).exists() for f in FASHION_MNIST_FILES) or all(
        (DEBIAN_FASHION_MNIST / f"{f}.gz").exists() for f in FASHION_MNIST_FILES)


def fashion_mnist_wait(runtime: Runtime, root: Path, max_steps: int | None, batch: int = 128
                       ) -> dict:
    """The default run's data, model and method (conf/data/fashion_mnist.yaml in memory,
    LeNet width 0.125, standard dropout); one warm-up step, then an epoch (or its first ``max_steps`` steps)."""
    data = build_data(config("data", "fashion_mnist", root=str(root), batch_size=batch))
    parts = _parts("lenet", data.info, runtime, width=0.125)
    timed_epoch(parts, data.train, 0, 1)  # warm-up
    facts = timed_epoch(parts, data.train, 1, max_steps)
    span = "whole epoch" if max_steps is None else f"first {facts['steps']} steps of an epoch"
    facts["setting"] = f"in-memory loader, batch {batch}, lenet width 0.125 + standard dropout, {span}"
    return facts


def write_jpeg_tree(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> None:
    """An ImageFolder tree ``root/{train,val}/<class>/*.jpg`` of random-textured JPEGs."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for split, count in (("train", per_class), ("val", max(1, per_class // 4))):
        for label in range(classes):
            folder = root / split / f"class{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                # Smooth noise (a low-resolution draw, upscaled) compresses like a photo.
                low = torch.randint(0, 256, (3, size // 8, size // 8), generator=generator,
                                    dtype=torch.uint8)
                image = Image.fromarray(low.permute(1, 2, 0).numpy()).resize((size, size))
                image.save(folder / f"{index:05d}.jpg", quality=90)


def image_folder_wait(runtime: Runtime, *, classes: int, per_class: int, file_size: int,
                      image_size: int, batch: int, workers: int, width: float) -> dict:
    """An ImageFolder tree in a temporary folder, read by ``workers`` DataLoader workers
    with the ImageNet augmentation, training a narrow ResNet-18; the second epoch (workers
    already started) is the one reported, the first is given beside it."""
    with tempfile.TemporaryDirectory(prefix="regdrop-bench-") as folder:
        root = Path(folder)
        write_jpeg_tree(root, classes, per_class, file_size)
        data = build_data(config("data", "imagenet", root=str(root), batch_size=batch,
                                 eval_batch_size=batch, num_workers=workers,
                                 image_size=image_size))
        parts = _parts("resnet18", data.info, runtime, width=width)
        first = timed_epoch(parts, data.train, 0, None)
        facts = timed_epoch(parts, data.train, 1, None)
        del data  # stop the persistent workers before the folder goes
    facts["first_epoch_wait_fraction"] = first["wait_fraction"]
    facts["setting"] = (f"{classes * per_class} JPEGs of {file_size} px, RandomResizedCrop "
                        f"{image_size} + flip, batch {batch}, {workers} workers, resnet18 width "
                        f"{width:g}; second epoch (first, with worker start-up: "
                        f"{first['wait_fraction']:.1%})")
    return facts


def data_facts(runtime: Runtime, data_root: Path, *, fashion_steps: int | None,
               folder: dict) -> tuple[dict, list[str]]:
    """Both data cases; a missing Fashion-MNIST is a note, not a failure."""
    facts, notes = {}, []
    if fashion_mnist_installed(data_root):
        facts["fashion_mnist"] = fashion_mnist_wait(runtime, data_root, fashion_steps)
    else:
        notes.append("data: Fashion-MNIST is not installed (Debian package "
                     "dataset-fashion-mnist), its wait fraction was not measured")
    facts["image_folder"] = image_folder_wait(runtime, **folder)
    return facts, notes

