"""Augmentation of in-memory uint8 image batches: crop and flip, centre crop, timm's
RandAugment per image and random erasing (the ``data`` keys are described in
`regdrop.data`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


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
