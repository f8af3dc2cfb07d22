"""ImageNet-style image folders: one sub-folder of images per class, read with Pillow.

Sorted sub-folder names give the class indices. With ``train/`` and ``val/`` (or ``test/``)
sub-folders, "train" and "calib" read ``train/`` and "test" reads ``val/`` (else ``test/``); otherwise
the folder itself is every split. The evaluation transform is ImageNet's (resize the shorter side to
256, center crop 224, normalize); "train" uses a random resized crop and a random horizontal flip
instead. Torchvision is not a dependency; the transforms below reimplement its PIL code paths.
Every failure raises `DataError` (or its `ImageReadError`) with one line naming the path and the problem.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Image transforms (torchvision's PIL code paths, written out)


def resize_shorter(image: Any, size: int) -> Any:
    """Resize a PIL image so its shorter side is `size` (bilinear), keeping the aspect ratio."""
    from PIL import Image

    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.BILINEAR)


def center_crop(image: Any, size: int) -> Any:
    """The central `size` x `size` crop of a PIL image (padded with zeros if it is smaller)."""
    w, h = image.size
    if w < size or h < size:
        from PIL import Image

        padded = Image.new(image.mode, (max(w, size), max(h, size)))
        padded.paste(image, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        image, (w, h) = padded, padded.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of a random crop covering `scale` of the area with an
    aspect ratio in `ratio` (log-uniform); ten tries, then the central crop (torchvision's rule)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_normalized_tensor(image: Any, mean: tuple[float, ...] = IMAGENET_MEAN,
                         std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """An RGB PIL image as a float32 [3, H, W] tensor, scaled to [0, 1], then (x - mean) / std."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (tensor - mean_t) / std_t


# ----------------------------------------------------------------------------------------------
# Image folders


class ImageReadError(DataError):
    """An image that cannot be decoded, also when a DataLoader worker process decodes it.

    torch's DataLoader re-raises a worker's exception in the main process as
    `type(message=text)` when the type has a `message` attribute, with the worker's whole traceback
    in `text`; this type keeps only its own message from it, so the CLI still prints one line.
    """

    message = True  # the attribute torch's ExceptionWrapper.reraise looks for

    def __init__(self, text: str = "", *, message: str | None = None) -> None:
        if message is not None:
            text = _original_message(message, type(self))
        super().__init__(text)


def _original_message(traceback_text: str, kind: type) -> str:
    """The message of a `kind` exception from its formatted traceback, whose last line is
    `module.Kind: message` (the message may itself hold newlines, e.g. from a file name)."""
    marker = f"{kind.__module__}.{kind.__qualname__}: "
    if marker not in traceback_text:
        return traceback_text.strip().splitlines()[-1]
    return traceback_text.split(marker, 1)[1].removesuffix("\n")


def _entries(folder: Path) -> list[os.DirEntry]:
    """The entries of `folder` sorted by name; DataError when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as err:
        raise DataError(f"{folder}: cannot list the folder ({err.strerror or err})") from None


def _class_dirs(folder: Path) -> list[str]:
    return [entry.name for entry in _entries(folder) if entry.is_dir() and not entry.name.startswith(".")]


class ImageFolderDataset(Dataset):
    """Images of an ImageNet-style folder: (normalized [3, S, S] tensor, class index).

    `train=True` applies the random resized crop (scale 0.08-1, ratio 3/4-4/3) and a random
    horizontal flip; otherwise resize the shorter side to `resize_size` and center crop
    `image_size`. The random stream is a `random.Random` seeded with `seed` (and by `reseed`, which
    the trainer calls every epoch); inside a DataLoader worker it is reseeded once from the
    worker's seed, so workers draw different crops and a seeded loader is reproducible.
    """

    def __init__(
        self,
        root: Path,
        classes: list[str],
        samples: list[tuple[Path, int]],
        train: bool = False,
        image_size: int = 224,
        resize_size: int = 256,
        seed: int = 0,
    ) -> None:
        self.root = root
        self.classes = classes
        self.samples = samples
        self.train = train
        self.image_size = int(image_size)
        self.resize_size = int(resize_size)
        self.seed = seed
        self._rng = random.Random(seed)
        self._rng_worker: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream of the main process (workers draw from their own)."""
        self._rng = random.Random(seed)

    def _random(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._rng_worker != info.id:
            self._rng = random.Random(info.seed)
            self._rng_worker = info.id
        return self._rng

    def load_image(self, path: Path) -> Any:
        """The image at `path` as RGB; ImageReadError when Pillow cannot read or decode it."""
        from PIL import Image

        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        # Decoders of damaged files raise more than OSError (SyntaxError, struct.error, zlib.error,
        # EOFError, ...): whatever decoding one file raises is that file's problem.
        except Exception as err:
            raise ImageReadError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path, label = self.samples[index]
        image = self.load_image(path)
        if self.train:
            from PIL import Image

            rng = self._random()
            left, top, w, h = random_resized_crop_box(image.width, image.height, rng)
            image = image.crop((left, top, left + w, top + h)).resize(
                (self.image_size, self.image_size), Image.BILINEAR)
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            _check_resized_area(path, image.size, self.resize_size)
            image = center_crop(resize_shorter(image, self.resize_size), self.image_size)
        return to_normalized_tensor(image), torch.tensor(label, dtype=torch.int64)

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, {self.num_classes} classes, "
                f"{mode} transform {self.image_size}/{self.resize_size})")


def _check_resized_area(path: Path, size: tuple[int, int], shorter: int) -> None:
    """Refuse an image whose aspect ratio would blow up when its shorter side is resized: a tiny
    1 x 100000 PNG would become a 256 x 25.6M image (20 GB) before the center crop."""
    from PIL import Image

    w, h = size
    area = shorter * shorter * max(w, h) / max(min(w, h), 1)
    if Image.MAX_IMAGE_PIXELS is not None and area > Image.MAX_IMAGE_PIXELS:
        raise ImageReadError(f"{path}: a {w} x {h} image resized to {shorter} pixels on its shorter side would have "
                             f"{area:.3g} pixels, more than Pillow's limit of {Image.MAX_IMAGE_PIXELS}")


def _image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, sorted, following links; refuses a link loop (it would list
    the same images again and again) and an image name that is not a regular file (a FIFO would
    block the reader forever, a dangling link fails late)."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    pending = [folder]
    while pending:
        current = pending.pop()
        stat = current.stat()
        if (stat.st_dev, stat.st_ino) in seen:
            raise DataError(f"{current}: this folder is reached a second time through a link (a link loop?)")
        seen.add((stat.st_dev, stat.st_ino))
        subfolders = []
        for entry in _entries(current):
            path = Path(entry.path)
            if entry.is_dir():
                subfolders.append(path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                if not entry.is_file():
                    raise DataError(f"{path}: not a regular file (a broken link, a FIFO or a device?)")
                found.append(path)
        pending.extend(reversed(subfolders))
    return found


def load_image_folder(root: Path, split: str, seed: int, image_size: int, resize_size: int) -> ImageFolderDataset:
    subdirs = set(_class_dirs(root))
    split_dirs = [name for name in ("train", "val", "test") if name in subdirs]
    if split_dirs:
        if split in ("train", "calib"):
            if "train" not in subdirs:
                raise DataError(f"{root}: has {'/, '.join(split_dirs)}/ but no train/ folder for split {split!r}")
            folder = root / "train"
        else:
            if "val" not in subdirs and "test" not in subdirs:
                raise DataError(f"{root}: has train/ but no val/ or test/ folder for split 'test'")
            folder = root / ("val" if "val" in subdirs else "test")
        # One class list for all splits, so the indices agree between train and val/test.
        classes = sorted(set().union(*(_class_dirs(root / name) for name in split_dirs)))
    else:
        folder = root
        classes = sorted(subdirs)
    if not classes:
        raise DataError(f"{folder}: no class sub-folders (expected one folder of images per class)")
    index = {name: i for i, name in enumerate(classes)}
    samples = [(path, index[name]) for name in _class_dirs(folder) for path in _image_files(folder / name)]
    if not samples:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class sub-folders")
    return ImageFolderDataset(folder, classes, samples, train=split == "train", image_size=image_size,
                              resize_size=resize_size, seed=seed)


__all__ = [
    "ImageFolderDataset", "ImageReadError", "load_image_folder", "resize_shorter", "center_crop",
    "random_resized_crop_box", "to_normalized_tensor", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS",
]
