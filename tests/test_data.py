"""Data loading (ann2snn/data/sets.py, ann2snn/data/image_folder.py): digits, .npz arrays, image folders, loaders, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ann2snn.data.sets import ArrayDataset, dataset_input_shape, load_dataset, make_loader, num_classes
from ann2snn.data.image_folder import (IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, center_crop,
                                  random_resized_crop_box, resize_shorter)
from ann2snn.errors import Ann2SnnError, DataError

# ------------------------------------------------------------------------------------------ digits


def test_digits_splits():
    train, test, calib = (load_dataset("digits", split) for split in ("train", "test", "calib"))
    assert (len(train), len(test), len(calib)) == (1347, 450, 1347)
    x, y = test[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    for ds in (train, test):
        assert ds.x.min() >= 0 and ds.x.max() <= 1 and ds.x.max() == 1
        assert set(ds.y.tolist()) == set(range(10))
    assert torch.equal(calib.x, train.x) and torch.equal(calib.y, train.y)
    assert dataset_input_shape(test) == (1, 8, 8) and num_classes(test) == 10
    # Stratified: every class is about a quarter test.
    counts = torch.bincount(test.y, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47
    assert len(train) + len(test) == 1797  # a partition of scikit-learn's 1797 images


def test_digits_deterministic():
    a, b = load_dataset("digits", "test"), load_dataset("digits", "test", seed=5)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    # The values are the 0..16 pixel counts over 16.
    assert torch.equal(torch.round(a.x * 16), a.x * 16)


def test_make_loader_seeded_shuffle():
    ds = load_dataset("digits", "test")
    first = [y for _, y in make_loader(ds, 64, shuffle=True, seed=3)]
    again = [y for _, y in make_loader(ds, 64, shuffle=True, seed=3)]
    other = [y for _, y in make_loader(ds, 64, shuffle=True, seed=4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    ordered = torch.cat([y for _, y in make_loader(ds, 100)])
    assert torch.equal(ordered, ds.y)
    assert len(make_loader(ds, 100)) == 5


def test_unknown_split_and_spec(tmp_path):
    with pytest.raises(DataError, match="split"):
        load_dataset("digits", "validation")
    missing = tmp_path / "nothing.npz"
    with pytest.raises(DataError) as info:
        load_dataset(str(missing))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    other = tmp_path / "data.csv"
    other.write_text("1,2\n")
    with pytest.raises(DataError, match="data.csv"):
        load_dataset(str(other))
    assert issubclass(DataError, Ann2SnnError)


# --------------------------------------------------------------------------------------------- npz


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((12, 3, 5, 6)).astype(np.float32)
    y = rng.integers(0, 4, 12)
    y[0] = 3
    path = tmp_path / "set.npz"
    np.savez(path, x=x, y=y)
    for split in ("train", "test", "calib"):
        ds = load_dataset(str(path), split)
        assert isinstance(ds, ArrayDataset) and len(ds) == 12
        assert np.array_equal(ds.x.numpy(), x) and np.array_equal(ds.y.numpy(), y)
        assert ds.y.dtype == torch.int64
    assert dataset_input_shape(ds) == (3, 5, 6) and num_classes(ds) == 4
    batches = list(make_loader(ds, 5))
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]


def test_npz_train_test_arrays(tmp_path):
    path = tmp_path / "split.npz"
    np.savez(path, x_train=np.zeros((6, 1, 4, 4)), y_train=np.array([0, 1, 2, 0, 1, 2]),
             x_test=np.ones((3, 1, 4, 4)), y_test=np.array([4, 0, 1]))
    train, test, calib = (load_dataset(path, s) for s in ("train", "test", "calib"))
    assert (len(train), len(test), len(calib)) == (6, 3, 6)
    assert test.x.eq(1).all() and train.x.eq(0).all() and train.x.dtype == torch.float32
    assert num_classes(train) == num_classes(test) == 5


def test_npz_grayscale_without_channel_axis(tmp_path):
    path = tmp_path / "gray.npz"
    np.savez(path, x=np.zeros((4, 8, 8)), y=np.arange(4))
    assert dataset_input_shape(load_dataset(path)) == (1, 8, 8)


@pytest.mark.parametrize("arrays, problem", [
    ({"a": np.zeros(3)}, "needs arrays"),
    ({"x": np.zeros((4, 1, 2, 2)), "y": np.zeros(3, dtype=int)}, "4 samples"),
    ({"x": np.zeros((4, 1, 1, 2, 2)), "y": np.zeros(4, dtype=int)}, "shape"),
    ({"x": np.zeros((2, 1, 2, 2)), "y": np.array([0.5, 1.0])}, "integers"),
    ({"x": np.zeros((2, 1, 2, 2)), "y": np.array([-1, 1])}, ">= 0"),
    ({"x": np.zeros((0, 1, 2, 2)), "y": np.zeros(0, dtype=int)}, "empty"),
])
def test_bad_npz(tmp_path, arrays, problem):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    message = str(info.value)
    assert str(path) in message and problem in message and "\n" not in message


def test_corrupt_npz(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="corrupt.npz"):
        load_dataset(str(path))
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="objects.npz"):
        load_dataset(str(pickled))


# ----------------------------------------------------------------------------------- image folders


def _image(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture()
def image_root(tmp_path):
    """train/ and val/ with classes 'cat' (red) and 'dog' (blue), 3 images of 40x30 each."""
    root = tmp_path / "imgs"
    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split in ("train", "val"):
        for name, color in colors.items():
            for k, ext in enumerate((".png", ".JPG", ".bmp")):
                _image(root / split / name / f"{k}{ext}", color)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_eval(image_root):
    ds = load_dataset(str(image_root), "test", image_size=16, resize_size=20)
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 6
    assert ds.root == image_root / "val" and ds.classes == ["cat", "dog"]
    assert num_classes(ds) == 2 and dataset_input_shape(ds) == (3, 16, 16)
    labels = [int(ds[i][1]) for i in range(len(ds))]
    assert labels == [0, 0, 0, 1, 1, 1]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    blue = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    for i, color in ((0, red), (3, blue)):  # PNG images: lossless
        x, _ = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        torch.testing.assert_close(x, ((color - mean) / std).expand(3, 16, 16), atol=1e-5, rtol=0)
    x, y = next(iter(make_loader(ds, 4)))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 0, 1]


def test_image_folder_train_and_calib(image_root):
    train = load_dataset(image_root, "train", image_size=16, resize_size=20)
    calib = load_dataset(image_root, "calib", image_size=16, resize_size=20)
    assert train.root == calib.root == image_root / "train" and len(train) == 6
    assert train.train and not calib.train
    assert all(train[i][0].shape == (3, 16, 16) for i in range(len(train)))
    # A solid-color image stays solid under any crop and flip.
    torch.testing.assert_close(train[0][0], calib[0][0], atol=1e-5, rtol=0)


def test_image_folder_without_splits(tmp_path):
    for name in ("b", "a"):
        for k in range(2):
            _image(tmp_path / name / f"{k}.jpeg", (0, 255, 0), size=(30, 40))
    for split in ("train", "test", "calib"):
        ds = load_dataset(tmp_path, split, image_size=8, resize_size=10)
        assert ds.root == tmp_path and ds.classes == ["a", "b"] and len(ds) == 4
    assert ds[0][0].shape == (3, 8, 8)


def test_train_augmentation_is_seeded_and_random(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    (tmp_path / "c").mkdir()
    image.save(tmp_path / "c" / "x.png")
    a, b = (load_dataset(tmp_path, "train", seed=1, image_size=8, resize_size=10) for _ in range(2))
    first = [a[0][0] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(first, [b[0][0] for _ in range(4)]))
    assert not all(torch.equal(first[0], x) for x in first[1:])
    evaluation = load_dataset(tmp_path, "test", image_size=8, resize_size=10)
    assert torch.equal(evaluation[0][0], evaluation[0][0])


def test_worker_loaders_are_reproducible(tmp_path):
    rng = np.random.default_rng(1)
    for k in range(4):
        (tmp_path / f"c{k % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / f"c{k % 2}" / f"{k}.png")
    ds = load_dataset(tmp_path, "train", image_size=8, resize_size=10)
    runs = [torch.cat([x for x, _ in make_loader(ds, 1, workers=2, seed=7)]) for _ in range(2)]
    assert runs[0].shape == (4, 3, 8, 8) and torch.equal(runs[0], runs[1])


def test_transforms():
    image = Image.new("RGB", (40, 30))
    assert resize_shorter(image, 20).size == (26, 20)
    assert resize_shorter(Image.new("RGB", (30, 40)), 20).size == (20, 26)
    assert center_crop(resize_shorter(image, 20), 16).size == (16, 16)
    assert center_crop(Image.new("RGB", (4, 4)), 6).size == (6, 6)
    import random

    rng = random.Random(0)
    for _ in range(50):
        left, top, w, h = random_resized_crop_box(40, 30, rng)
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30 and w > 0 and h > 0
    # Impossible ratio: falls back to a central crop within the image.
    left, top, w, h = random_resized_crop_box(100, 2, random.Random(0), scale=(0.99, 1.0))
    assert (w, h) == (3, 2) and left + w <= 100


def test_bad_image_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        load_dataset(empty)
    assert str(empty) in str(info.value) and "class" in str(info.value)

    no_images = tmp_path / "no_images"
    (no_images / "cls").mkdir(parents=True)
    (no_images / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images") as info:
        load_dataset(no_images)
    assert str(no_images) in str(info.value)

    only_train = tmp_path / "only_train"
    _image(only_train / "train" / "c" / "0.png", (1, 2, 3))
    with pytest.raises(DataError, match="val/ or test/") as info:
        load_dataset(only_train, "test")
    assert str(only_train) in str(info.value)
    assert len(load_dataset(only_train, "calib")) == 1

    broken = tmp_path / "broken"
    (broken / "c").mkdir(parents=True)
    (broken / "c" / "bad.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds = load_dataset(broken)
    with pytest.raises(DataError) as info:
        ds[0]
    assert str(broken / "c" / "bad.jpg") in str(info.value) and "\n" not in str(info.value)
