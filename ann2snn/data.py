"""Data sets for calibration, training and evaluation: digits, .npz arrays, image folders.

`load_dataset(spec, split)` understands three kinds of `spec`:

- ``"digits"``: scikit-learn's bundled 8x8 digits, [1, 8, 8] float32 in [0, 1], a fixed stratified
  75/25 train/test split (random_state 0, 1347 / 450 images); "calib" is the train split.
- a ``.npz`` file with ``x`` (N, C, H, W) and ``y`` (N,), used for every split, or with
  ``x_train, y_train, x_test, y_test`` (train and calib use the first pair, test the second).
- a directory: an ImageNet-style image folder, one sub-folder per class (sorted names give the
  class indices). With ``train/`` and ``val/`` (or ``test/``) sub-folders, "train" and "calib" read
  ``train/`` and "test" reads ``val/`` (else ``test/``); otherwise the folder itself is every split.
  The evaluation transform is ImageNet's (resize the shorter side to 256, center crop 224,
  normalize); "train" uses a random resized crop and a random horizontal flip instead.

- ``"fashion-mnist"`` / ``"mnist"``: the IDX files of /usr/share/datasets/fashion-mnist (Debian's
  dataset-fashion-mnist) or /usr/share/datasets/mnist; and any folder holding IDX files
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each possibly gzipped as ``.gz``). Images [1, H, W] float32 in
  [0, 1] (bytes / 255, as digits are scaled to [0, 1]), 10 classes; "train" and "calib" read the
  train files, "test" the t10k files.

Every failure raises `DataError` with one line naming the path and the problem. Torchvision is not
a dependency; the transforms below reimplement its PIL code paths.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .errors import DataError

SPLITS = ("train", "test", "calib")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
# Labels are class indices and a model gets one logit per class: a label of 10**9 in a hostile file
# would make training build a 10**9-way classifier. More than ImageNet-21k's 21,841 classes.
MAX_CLASSES = 100_000


# ----------------------------------------------------------------------------------------------
# Array data sets (digits, .npz)


class ArrayDataset(Dataset):
    """In-memory (x, y) pairs: x float32 [N, C, H, W], y int64 [N]."""

    def __init__(self, x: Tensor, y: Tensor, num_classes: int, name: str = "", source: str | None = None) -> None:
        self.x = x
        self.y = y
        self.num_classes = int(num_classes)
        self.name = name
        self.source = source if source is not None else name  # what error messages name: the file

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __repr__(self) -> str:
        return f"ArrayDataset({self.name!r}, {len(self)} samples, input {self.input_shape}, {self.num_classes} classes)"


def _load_digits(split: str) -> ArrayDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y)
    xs, ys = (x_test, y_test) if split == "test" else (x_train, y_train)
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(xs)).unsqueeze(1),
                        torch.from_numpy(np.ascontiguousarray(ys)), 10, name=f"digits:{split}", source="digits")


def _array_pair(path: Path, x: np.ndarray, y: np.ndarray, xname: str, yname: str) -> tuple[Tensor, Tensor]:
    x = _images(path, x, xname)
    y = _labels(path, np.asarray(y), yname)
    if len(y) != len(x):
        raise DataError(f"{path}: {xname!r} has {len(x)} samples but {yname!r} has {len(y)}")
    return x, y


def _images(path: Path, x: np.ndarray, name: str) -> Tensor:
    """x as float32 (N, C, H, W), every value finite: a NaN or Inf image would give NaN logits,
    which argmax turns into a silently wrong accuracy."""
    # complex is a numpy number, but casting it to float32 drops the imaginary part
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{path}: array {name!r} must hold real numbers, found dtype {x.dtype}")
    if x.ndim == 3:  # (N, H, W): one channel
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: array {name!r} must have shape (N, C, H, W) or (N, H, W), found {tuple(x.shape)}")
    if x.size == 0:
        raise DataError(f"{path}: array {name!r} is empty (shape {tuple(x.shape)})")
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if not bool(torch.isfinite(images).all()):  # after the cast: float64 values beyond float32 become inf
        bad = torch.nonzero(~torch.isfinite(images))[0].tolist()
        raise DataError(f"{path}: array {name!r} must be finite in float32, found {images[tuple(bad)].item()} "
                        f"at index {tuple(bad)}")
    return images


def _labels(path: Path, y: np.ndarray, name: str) -> Tensor:
    """y as int64 (N,) class indices in 0..MAX_CLASSES - 1."""
    if y.ndim != 1:
        raise DataError(f"{path}: array {name!r} must have shape (N,), found {tuple(y.shape)}")
    if len(y) == 0:
        raise DataError(f"{path}: array {name!r} is empty")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{path}: labels {name!r} must be integers, found non-integral {y.dtype} values")
    elif not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(f"{path}: labels {name!r} must be integers, found dtype {y.dtype}")
    # compared before the cast: 2**63 as uint64 or 1e30 as float would wrap or saturate in int64
    if y.min() < 0:
        raise DataError(f"{path}: labels {name!r} must be class indices >= 0, found {y.min()}")
    if y.max() >= MAX_CLASSES:
        raise DataError(f"{path}: labels {name!r} must be class indices below {MAX_CLASSES}, found {y.max()}")
    return torch.from_numpy(y.astype(np.int64))


def _load_npz(path: Path, split: str) -> ArrayDataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as err:  # zipfile, pickle refusal, truncated file, not an npz
        raise DataError(f"{path}: cannot read as .npz ({type(err).__name__}: {err})") from None
    if {"x_train", "y_train", "x_test", "y_test"} <= set(arrays):
        pairs = {name: _array_pair(path, arrays[f"x_{name}"], arrays[f"y_{name}"], f"x_{name}", f"y_{name}")
                 for name in ("train", "test")}
        if pairs["train"][0].shape[1:] != pairs["test"][0].shape[1:]:
            raise DataError(f"{path}: x_train samples have shape {tuple(pairs['train'][0].shape[1:])} "
                            f"but x_test samples {tuple(pairs['test'][0].shape[1:])}")
        classes = 1 + max(int(pairs["train"][1].max()), int(pairs["test"][1].max()))
        x, y = pairs["test"] if split == "test" else pairs["train"]
    elif {"x", "y"} <= set(arrays):
        x, y = _array_pair(path, arrays["x"], arrays["y"], "x", "y")
        classes = 1 + int(y.max())
    else:
        raise DataError(f"{path}: .npz needs arrays 'x' and 'y' (or x_train, y_train, x_test, y_test); "
                        f"found {', '.join(sorted(arrays)) or 'none'}")
    return ArrayDataset(x, y, classes, name=f"{path}:{split}", source=str(path))


# ----------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)


IDX_FOLDERS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
IDX_CLASSES = 10  # MNIST, Fashion-MNIST and KMNIST: ten classes, labels 0..9
# split -> file prefix; each file is "<prefix>-<kind>-idx<dims>-ubyte", optionally ".gz"
_IDX_PREFIXES = {"train": "train", "calib": "train", "test": "t10k"}
_IDX_KINDS = {"images": 3, "labels": 1}  # kind -> dimensions
_IDX_UBYTE = 0x08
_READ_CHUNK = 1 << 20


def _idx_candidates(folder: Path, prefix: str, kind: str) -> list[Path]:
    """The names an IDX file goes by: "-idx3-ubyte" (LeCun's) or ".idx3-ubyte", plain or gzipped."""
    dims = _IDX_KINDS[kind]
    return [folder / f"{prefix}-{kind}{sep}idx{dims}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]


def is_idx_folder(folder: Path) -> bool:
    """A folder holding at least one IDX file of the MNIST names (an image folder holds none)."""
    return any(p.is_file() for prefix in ("train", "t10k") for kind in _IDX_KINDS
               for p in _idx_candidates(folder, prefix, kind))


def _idx_file(folder: Path, prefix: str, kind: str) -> Path:
    found = [p for p in _idx_candidates(folder, prefix, kind) if p.is_file()]
    if not found:
        raise DataError(f"{folder}: no IDX file {prefix}-{kind}-idx{_IDX_KINDS[kind]}-ubyte (or .gz) in the folder")
    return found[0]


def _read_count(stream: Any, path: Path, count: int, what: str) -> bytes:
    """Exactly `count` bytes, in chunks: a hostile header must not make one huge allocation."""
    chunks, left = [], count
    while left > 0:
        chunk = stream.read(min(left, _READ_CHUNK))
        if not chunk:
            raise DataError(f"{path}: truncated IDX file: {what} needs {count} bytes, found {count - left}")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped when its name ends in .gz) with `dims` dimensions:
    magic 0x0000 08 <dims>, then each dimension as a big-endian uint32, then the bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            magic = _read_count(stream, path, 4, "the magic number")
            if magic[:3] != bytes((0, 0, _IDX_UBYTE)) or magic[3] != dims:
                raise DataError(f"{path}: not an IDX file of {dims}-d unsigned bytes (magic 0x{magic.hex()}, "
                                f"expected 0x00000{_IDX_UBYTE:x}0{dims})")
            shape = tuple(int(d) for d in np.frombuffer(_read_count(stream, path, 4 * dims, "the header"), ">u4"))
            data = _read_count(stream, path, math.prod(shape), f"shape {shape}")
            if stream.read(1):
                raise DataError(f"{path}: IDX file longer than its header's shape {shape} says")
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read IDX file ({type(err).__name__}: {err})") from None
    if shape[0] == 0:
        raise DataError(f"{path}: IDX file holds no samples")
    return np.frombuffer(data, np.uint8).reshape(shape)


def _load_idx(folder: Path, split: str) -> ArrayDataset:
    prefix = _IDX_PREFIXES[split]
    images_path, labels_path = _idx_file(folder, prefix, "images"), _idx_file(folder, prefix, "labels")
    images, labels = _read_idx(images_path, 3), _read_idx(labels_path, 1)
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels but {images_path.name} has {len(images)} images")
    if labels.max() >= IDX_CLASSES:
        index = int(np.argmax(labels >= IDX_CLASSES))
        raise DataError(f"{labels_path}: label {labels[index]} at index {index} is out of range 0..{IDX_CLASSES - 1}")
    # scaled to [0, 1] as the digits set is (its 0..16 over 16)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return ArrayDataset(x, y, IDX_CLASSES, name=f"{folder}:{split}", source=str(folder))


def _idx_folder(name: str) -> Path:
    """The folder of a named IDX data set ("fashion-mnist", "mnist")."""
    folder = Path(IDX_FOLDERS[name])
    if not folder.is_dir():
        raise DataError(f"{name}: {folder} not found (install the Debian package dataset-{name}, or pass "
                        "the folder that holds its IDX files)")
    return folder


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


def _load_image_folder(root: Path, split: str, seed: int, image_size: int, resize_size: int) -> ImageFolderDataset:
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


# ----------------------------------------------------------------------------------------------
# Public entry points


def load_dataset(
    spec: str | os.PathLike,
    split: str = "test",
    seed: int = 0,
    image_size: int = 224,
    resize_size: int = 256,
) -> Dataset:
    """The `split` ("train", "test" or "calib") of data set `spec`: "digits", "fashion-mnist", "mnist",
    an .npz file, a folder of IDX files or an image folder (see the module docstring). `seed` seeds the random training augmentation of
    image folders; the digits split is fixed (random_state 0) so test accuracies stay comparable."""
    if split not in SPLITS:
        raise DataError(f"{spec}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    text = os.fspath(spec)
    if text == "digits":
        return _load_digits(split)
    if text in IDX_FOLDERS:
        return _load_idx(_idx_folder(text), split)
    path = Path(text).expanduser()
    if path.is_dir():
        if is_idx_folder(path):
            return _load_idx(path, split)
        return _load_image_folder(path, split, seed, image_size, resize_size)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (expected 'digits', 'fashion-mnist', 'mnist', an .npz file, a folder of IDX files or an image folder)")
    if not path.is_file():  # a FIFO would block the reader forever, a device never end
        raise DataError(f"{path}: not a regular file or folder (expected 'digits', 'fashion-mnist', 'mnist', an .npz file, a folder of IDX files or an image folder)")
    if path.suffix.lower() == ".npz":
        return _load_npz(path, split)
    raise DataError(f"{path}: unsupported data set (expected 'digits', 'fashion-mnist', 'mnist', an .npz file, a folder of IDX files or an image folder)")


def _unwrap(dataset: Dataset) -> Dataset:
    """The data set behind torch Subset / ConcatDataset-like wrappers."""
    seen = 0
    while hasattr(dataset, "dataset") and seen < 16:
        dataset = dataset.dataset  # type: ignore[attr-defined]
        seen += 1
    return dataset


def dataset_input_shape(dataset: Dataset) -> tuple[int, ...]:
    """The shape of one input sample, e.g. (1, 8, 8) or (3, 224, 224)."""
    inner = _unwrap(dataset)
    shape = getattr(inner, "input_shape", None)
    if shape is not None:
        return tuple(shape)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("empty data set: no input shape")
    return tuple(dataset[0][0].shape)


def dataset_source(dataset: Dataset) -> str:
    """What error messages about `dataset` name: its file or folder ("digits" for digits)."""
    inner = _unwrap(dataset)
    source = getattr(inner, "source", None) or getattr(inner, "root", None)
    return str(source) if source is not None else type(inner).__name__


def check_input_shape(data: str | os.PathLike, found: Sequence[int], expected: Sequence[int | str | None]) -> None:
    """Refuse samples of shape `found` (C, H, W) from `data` for a model whose input, without the
    batch dimension, is `expected` (a name or None: a free dimension), before anything runs on them.

    For `ann2snn convert --calib` (cli.py), after loading the calibration inputs:
    `check_input_shape(calib, tuple(calib_x.shape[1:]), inspect_onnx(model)["input"]["shape"][1:])`.
    """
    found, expected = tuple(int(d) for d in found), tuple(expected)
    fits = len(found) == len(expected) and all(
        not isinstance(e, int) or e <= 0 or e == f for f, e in zip(found, expected))
    if not fits:
        shown = "(" + ", ".join(str(e) if isinstance(e, int) and e > 0 else "any" for e in expected) + ")"
        raise DataError(f"{data}: the model takes samples of shape {shown}, found samples of shape {found}")


def largest_label(dataset: Dataset) -> int | None:
    """The largest label of the data set behind `dataset` (all of it, also under a Subset, so
    that every process of a sharded run refuses the same data); None when it has no labels."""
    inner = _unwrap(dataset)
    labels = getattr(inner, "y", None)
    if labels is None:
        labels = getattr(inner, "targets", None)
    if labels is None or len(labels) == 0:
        return None
    return int(max(labels)) if isinstance(labels, list) else int(labels.max())


def num_classes(dataset: Dataset) -> int:
    """The number of classes: the data set's own count, else 1 + the largest label."""
    inner = _unwrap(dataset)
    count = getattr(inner, "num_classes", None)
    if count is not None:
        return int(count)
    labels = getattr(inner, "targets", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
    if len(labels) == 0:
        raise DataError("empty data set: no classes")
    return 1 + int(max(int(v) for v in labels))


def draw(dataset: Dataset, samples: int | None, seed: int = 0) -> Dataset:
    """`samples` items of `dataset` drawn at random with `seed` (all of it when None or more): an
    image folder lists its images class by class, so its first N are one class, not a sample."""
    from torch.utils.data import Subset

    if samples is None or samples >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, sorted(order[:samples].tolist()))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader with a generator seeded by `seed`: a reproducible shuffle order and
    reproducible worker seeds (so random augmentations repeat for the same seed)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


__all__ = [
    "ArrayDataset", "ImageFolderDataset", "ImageReadError", "load_dataset", "dataset_input_shape", "dataset_source",
    "check_input_shape", "largest_label", "num_classes", "make_loader", "MAX_CLASSES",
    "resize_shorter", "center_crop", "random_resized_crop_box", "to_normalized_tensor",
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "SPLITS", "IDX_FOLDERS", "IDX_CLASSES", "is_idx_folder",
]
