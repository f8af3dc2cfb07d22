"""Hostile data given to `eval`, `energy`, `train` and `convert --calib` (issue 13): every bad
.npz file, image folder, energy table, init weights file and checkpoint ends with exit code 2, one
`ann2snn: error: <file>: ...` line naming the file and the problem (expected and found values), no
traceback, and no file created or modified. The bad inputs are built here, in tmp_path.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ann2snn
from ann2snn import models
from ann2snn.data.sets import check_input_shape
from ann2snn.errors import DataError
from ann2snn.train.export import export_onnx
from ann2snn.runtime.quant import QuantClippedActivation
from hostile import assert_refused, invoke, snapshot

ROOT = Path(__file__).resolve().parents[1]


def _site(channels: int) -> QuantClippedActivation:
    return QuantClippedActivation(levels=7, channels=channels)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A digits SNN (1x8x8 inputs, 10 classes), an RGB SNN (resnet20, 2 classes, any image size),
    a float digits ONNX file for `convert --calib`, and state dicts of the models `train` builds
    (one lambda per layer; "per_channel": one per channel), what `train --init` reads."""
    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    ann2snn.convert(models.build_model("digits-cnn", 10, activation=_site).eval()).save(folder / "digits.snn")
    ann2snn.convert(models.build_model("resnet20", 2, activation=_site).eval()).save(folder / "rgb2.snn")
    export_onnx(models.build_model("digits-cnn", 10).eval(), (1, 8, 8), folder / "float.onnx", qdq=False)
    per_layer = lambda channels: QuantClippedActivation(levels=7, clip=1.0)  # noqa: E731
    states = {"state10": ("digits-cnn", 10, per_layer), "state5": ("digits-cnn", 5, per_layer),
              "per_channel": ("digits-cnn", 10, _site), "rgb_state": ("resnet20", 2, per_layer)}
    for key, (name, classes, site) in states.items():
        state = models.build_model(name, classes, activation=site).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"{key}.safetensors"))
    return {"digits": folder / "digits.snn", "rgb": folder / "rgb2.snn", "onnx": folder / "float.onnx",
            **{key: folder / f"{key}.safetensors" for key in states}}


def _refused(result, bad: Path | str, *fragments: str, before: dict, folder: Path) -> str:
    shown = str(bad).replace("\n", "\\n")   # cli escapes newlines in messages
    return assert_refused(result, shown, *fragments, before=before, folders=(folder,))


# --- .npz files ----------------------------------------------------------------------------------

def _good_x(n: int = 4, shape: tuple[int, ...] = (1, 8, 8)) -> np.ndarray:
    return np.random.default_rng(0).random((n, *shape)).astype(np.float32)


def _npz(**arrays) -> Callable[[Path], None]:
    return lambda path: np.savez(path, **arrays)


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _good_npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=_good_x(), y=np.arange(4))
    return buffer.getvalue()


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, _good_x())
    return buffer.getvalue()


Y4 = np.arange(4)
# id -> (how to write the bad file, fragments the error line must hold besides the path)
NPZ_CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "missing_x": (_npz(y=Y4), ("needs arrays", "found y")),
    "missing_y": (_npz(x=_good_x()), ("needs arrays", "found x")),
    "no_arrays": (_npz(), ("needs arrays", "found none")),
    "x_rank2": (_npz(x=np.zeros((4, 64)), y=Y4), ("takes samples of shape (1, 8, 8) (C, H, W)",
                                                  "found samples of shape (64,)")),
    "x_rank5": (_npz(x=np.zeros((4, 1, 1, 8, 8)), y=Y4), ("(N, C, H, W)", "(4, 1, 1, 8, 8)")),
    "x_scalar": (_npz(x=np.float32(1.0), y=Y4), ("(N, C, H, W)", "found ()")),
    "x_strings": (_npz(x=np.full((4, 1, 8, 8), "a"), y=Y4), ("real numbers", "<U1")),
    "x_complex": (_npz(x=_good_x() + 1j, y=Y4), ("real numbers", "complex64")),
    "x_datetime": (_npz(x=np.zeros((4, 1, 8, 8), dtype="datetime64[s]"), y=Y4), ("real numbers", "datetime64")),
    "x_object": (_npz(x=np.array([{"a": 1}] * 4, dtype=object), y=Y4), ("cannot read as .npz", "allow_pickle")),
    "y_object": (_npz(x=_good_x(), y=np.array([None] * 4, dtype=object)), ("cannot read as .npz",)),
    "lengths_differ": (_npz(x=_good_x(4), y=np.arange(3)), ("'x' has 4 samples", "'y' has 3")),
    "x_empty": (_npz(x=np.zeros((0, 1, 8, 8)), y=np.zeros(0, dtype=int)), ("'x' is empty", "(0, 1, 8, 8)")),
    "x_zero_size_images": (_npz(x=np.zeros((4, 1, 0, 0)), y=Y4), ("'x' is empty", "(4, 1, 0, 0)")),
    "y_rank2": (_npz(x=_good_x(), y=Y4[:, None]), ("shape (N,)", "(4, 1)")),
    "y_fractional": (_npz(x=_good_x(), y=np.array([0, 0.5, 1, 2])), ("integers", "non-integral")),
    "y_nan": (_npz(x=_good_x(), y=np.array([0, np.nan, 1, 2])), ("integers",)),
    "y_strings": (_npz(x=_good_x(), y=np.array(["a", "b", "c", "d"])), ("integers", "<U1")),
    "y_negative": (_npz(x=_good_x(), y=np.array([0, -1, 1, 2])), (">= 0", "-1")),
    "y_huge": (_npz(x=_good_x(), y=np.array([0, 1, 2, 10**12])), ("below 100000", "1000000000000")),
    "y_uint64_wraps": (_npz(x=_good_x(), y=np.array([0, 1, 2, 2**63], dtype=np.uint64)), ("below 100000",)),
    "x_nan": (_npz(x=np.where(np.eye(8, dtype=bool), np.nan, _good_x()), y=Y4), ("finite", "nan", "(0, 0, 0, 0)")),
    "x_inf": (_npz(x=np.full((4, 1, 8, 8), np.inf), y=Y4), ("finite", "inf")),
    "x_minus_inf_float16": (_npz(x=np.full((4, 1, 8, 8), -np.inf, dtype=np.float16), y=Y4), ("finite", "-inf")),
    "x_beyond_float32": (_npz(x=np.full((4, 1, 8, 8), 1e300), y=Y4), ("finite in float32", "inf")),
    "x_channels": (_npz(x=_good_x(shape=(3, 8, 8)), y=Y4),
                   ("takes samples of shape (1, 8, 8)", "found samples of shape (3, 8, 8)")),
    "x_spatial": (_npz(x=_good_x(shape=(1, 16, 16)), y=Y4), ("(1, 8, 8)", "found samples of shape (1, 16, 16)")),
    "x_spatial_oblong": (_npz(x=_good_x(shape=(7, 9)), y=Y4), ("(1, 8, 8)", "found samples of shape (1, 7, 9)")),
    "x_tiny": (_npz(x=_good_x(shape=(1, 1, 1)), y=Y4), ("(1, 8, 8)", "found samples of shape (1, 1, 1)")),
    "not_a_zip": (_bytes(b"definitely not a zip file"), ("cannot read as .npz",)),
    "empty_file": (_bytes(b""), ("cannot read as .npz",)),
    "truncated_zip": (_bytes(_good_npz_bytes()[:300]), ("cannot read as .npz",)),
    "npy_named_npz": (_bytes(_npy_bytes()), ("cannot read as .npz",)),
    "pickle_named_npz": (_bytes(pickle.dumps({"x": 1})), ("cannot read as .npz",)),
    "train_test_shapes_differ": (_npz(x_train=_good_x(), y_train=Y4, x_test=_good_x(shape=(1, 4, 4)), y_test=Y4),
                                 ("x_train samples have shape (1, 8, 8)", "x_test samples (1, 4, 4)")),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_eval_refuses_a_bad_npz(inputs, tmp_path, case):
    write, fragments = NPZ_CASES[case]
    bad = tmp_path / f"{case}.npz"
    write(bad)
    before = snapshot(tmp_path)
    _refused(invoke("eval", inputs["digits"], "--data", bad), bad, *fragments, before=before, folder=tmp_path)


@pytest.mark.parametrize("case, command", [
    ("x_channels", "energy"), ("x_spatial", "energy"), ("x_nan", "energy"), ("lengths_differ", "energy"),
    ("x_spatial", "train"), ("x_nan", "train"), ("y_huge", "train"), ("missing_y", "train"),
    ("x_nan", "convert"), ("x_object", "convert"), ("x_complex", "convert"),
])
def test_energy_train_and_convert_refuse_a_bad_npz(inputs, tmp_path, case, command):
    write, fragments = NPZ_CASES[case]
    bad = tmp_path / f"{case}.npz"
    write(bad)
    if command == "train" and "spatial" in case:   # train builds the model for the data's channels, not size
        fragments = ("the model digits-cnn takes samples of shape (1, 8, 8)", "found samples of shape (1, 16, 16)")
    args = {"energy": ["energy", inputs["digits"], "--data", bad],
            "train": ["train", "--data", bad, "--epochs", "1", "-o", tmp_path / "out" / "m.onnx"],
            "convert": ["convert", inputs["onnx"], "-T", "3", "--calib", bad, "-o", tmp_path / "m.snn"]}[command]
    before = snapshot(tmp_path)
    _refused(invoke(*args), bad, *fragments, before=before, folder=tmp_path)


def test_labels_beyond_the_models_classes_are_refused(inputs, tmp_path):
    bad = tmp_path / "labels.npz"
    np.savez(bad, x=_good_x(), y=np.array([0, 3, 9, 10]))   # 10 is no class of a 10-logit model
    before = snapshot(tmp_path)
    _refused(invoke("eval", inputs["digits"], "--data", bad), bad, "labels go up to 10", "10 classes",
             before=before, folder=tmp_path)
    _refused(invoke("eval", inputs["digits"], "--data", bad, "--mode", "simulate"), bad, "10 classes",
             before=before, folder=tmp_path)


@pytest.mark.parametrize("kind", ["missing", "fifo", "device", "folder_without_classes", "csv", "idx",
                                  "idx_truncated", "newline_in_name"])
def test_data_paths_that_are_no_data_set(inputs, tmp_path, kind):
    bad = tmp_path / {"missing": "missing.npz", "fifo": "fifo.npz", "device": "zero.npz",
                      "folder_without_classes": "folder.npz", "csv": "data.csv", "idx": "train-images.idx3-ubyte",
                      "idx_truncated": "t10k-images-idx3-ubyte", "newline_in_name": "bad\nname.npz"}[kind]
    fragment = {"missing": "no such file", "fifo": "not a regular file", "device": "not a regular file",
                "folder_without_classes": "no class sub-folders", "csv": "unsupported data set",
                "idx": "unsupported data set", "idx_truncated": "unsupported data set",
                "newline_in_name": "finite"}[kind]
    if kind == "fifo":
        os.mkfifo(bad)                      # reading it would block forever
    elif kind == "device":
        bad.symlink_to("/dev/zero")         # reading it would never end
    elif kind == "folder_without_classes":
        bad.mkdir()
        (bad / "x.npy").write_bytes(_npy_bytes())
    elif kind == "csv":
        bad.write_text("0,1,2\n")
    elif kind in ("idx", "idx_truncated"):   # the loader does not read IDX (MNIST) files
        header = np.array([0x803, 4, 8, 8], dtype=">u4").tobytes()
        bad.write_bytes(header + bytes(4 * 64 if kind == "idx" else 10))
    elif kind == "newline_in_name":
        np.savez(bad, x=np.full((4, 1, 8, 8), np.nan), y=Y4)
    before = snapshot(tmp_path)
    line = _refused(invoke("eval", inputs["digits"], "--data", bad), bad, fragment, before=before, folder=tmp_path)
    assert "\n" not in line


# --- image folders -------------------------------------------------------------------------------

def _png(path: Path, size: tuple[int, int] = (20, 20), noise: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    else:
        Image.new("RGB", size, (200, 10, 10)).save(path)


def _truncated_png(path: Path) -> None:
    _png(path, (64, 64), noise=True)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])   # the header reads; decoding the pixels fails


def _folder(root: Path, classes: str = "ab", images: int = 2) -> Path:
    for c in classes:
        for i in range(images):
            _png(root / c / f"{i}.png")
    return root


def _build_image_case(case: str, root: Path) -> tuple[Path, tuple[str, ...]]:
    """(the path the error must name, other fragments) of an image folder `root` broken by `case`."""
    if case == "empty":
        root.mkdir()
        return root, ("no class sub-folders",)
    if case == "only_files":
        _png(root / "0.png")
        return root, ("no class sub-folders",)
    if case == "empty_classes":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
        return root, ("no images",)
    if case == "no_image_files":
        (root / "a").mkdir(parents=True)
        (root / "a" / "notes.txt").write_text("hello")
        return root, ("no images",)
    if case == "train_without_val":
        _folder(root / "train")
        return root, ("no val/ or test/",)
    _folder(root)
    bad = root / "a" / "bad.png"
    if case == "text_named_png":
        bad.write_text("not an image")
        return bad, ("cannot read image", "UnidentifiedImageError")
    if case == "truncated_png":
        _truncated_png(bad)
        return bad, ("cannot read image", "truncated")
    if case == "empty_png":
        bad.write_bytes(b"")
        return bad, ("cannot read image",)
    if case == "dangling_link":
        bad.symlink_to(root / "nowhere.png")
        return bad, ("not a regular file",)
    if case == "fifo":
        os.mkfifo(bad)                      # opening it would block forever
        return bad, ("not a regular file",)
    if case == "link_loop":
        (root / "a" / "loop").symlink_to(root / "a")   # the same images again and again
        return root / "a" / "loop", ("a second time through a link",)
    if case == "extreme_aspect":
        _png(bad, (1, 1400))                # resized to 256 pixels wide: 91.8M pixels before the crop
        return bad, ("1 x 1400", "Pillow's limit")
    if case == "too_many_classes":
        _folder(root, "abc")                # 3 classes for a model with 2 logits
        return root, ("labels go up to 2", "2 classes")
    raise AssertionError(case)


IMAGE_CASES = ["empty", "only_files", "empty_classes", "no_image_files", "train_without_val", "text_named_png",
               "truncated_png", "empty_png", "dangling_link", "fifo", "link_loop", "extreme_aspect",
               "too_many_classes"]


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_eval_refuses_a_bad_image_folder(inputs, tmp_path, case):
    bad, fragments = _build_image_case(case, tmp_path / "images")
    before = snapshot(tmp_path)
    _refused(invoke("eval", inputs["rgb"], "--data", tmp_path / "images", "--json"), bad, *fragments,
             before=before, folder=tmp_path)


@pytest.mark.parametrize("case", ["truncated_png", "text_named_png", "extreme_aspect"])
def test_a_bad_image_read_by_a_worker_process_gives_one_line(inputs, tmp_path, case):
    bad, fragments = _build_image_case(case, tmp_path / "images")
    before = snapshot(tmp_path)
    line = _refused(invoke("eval", inputs["rgb"], "--data", tmp_path / "images", "--workers", "1"), bad, *fragments,
                    before=before, folder=tmp_path)
    assert "DataLoader worker" not in line and "Original" not in line


def test_a_bad_image_with_a_newline_in_its_name_read_by_a_worker(inputs, tmp_path):
    root = _folder(tmp_path / "images")
    bad = root / "b" / "bad\nimage.png"
    bad.write_text("not an image")
    before = snapshot(tmp_path)
    line = _refused(invoke("eval", inputs["rgb"], "--data", root, "--workers", "1"), bad, "cannot read image",
                    before=before, folder=tmp_path)
    assert "DataLoader worker" not in line


@pytest.mark.parametrize("command", ["eval", "energy"])
def test_images_do_not_fit_the_digits_model(inputs, tmp_path, command):
    root = _folder(tmp_path / "images")
    before = snapshot(tmp_path)
    _refused(invoke(command, inputs["digits"], "--data", root), root, "takes samples of shape (1, 8, 8)",
             "found samples of shape (3, 224, 224)", before=before, folder=tmp_path)


def test_digits_do_not_fit_the_rgb_model(inputs, tmp_path):
    before = snapshot(tmp_path)
    _refused(invoke("eval", inputs["rgb"], "--data", "digits"), "digits", "takes samples of shape (3, 8, 8)",
             "found samples of shape (1, 8, 8)", before=before, folder=tmp_path)


def test_train_refuses_a_corrupt_training_image(tmp_path):
    root = tmp_path / "images"
    _folder(root / "train")
    _folder(root / "val")
    bad = root / "train" / "a" / "bad.png"
    _truncated_png(bad)
    before = snapshot(tmp_path)
    _refused(invoke("train", "--model", "resnet20", "--data", root, "--epochs", "1", "-o", tmp_path / "out" / "m.onnx",
                    "--json"), bad, "cannot read image", before=before, folder=tmp_path)


def test_train_refuses_a_corrupt_image_of_its_first_batch_with_the_progress_bar_on(inputs, tmp_path):
    """With every lambda from --init nothing is calibrated: the first image read is in the first
    training step, after the progress bar exists."""
    root = tmp_path / "images"
    _folder(root / "train", images=5)   # 11 images: fine-tuning holds one out for its validation
    _folder(root / "val")
    bad = root / "train" / "b" / "bad.png"
    bad.write_text("not an image")
    before = snapshot(tmp_path)
    _refused(invoke("train", "--model", "resnet20", "--data", root, "--epochs", "1", "--init", inputs["rgb_state"],
                    "-o", tmp_path / "out" / "m.onnx"), bad, "cannot read image", before=before, folder=tmp_path)


# --- energy tables -------------------------------------------------------------------------------

GOOD = {"mac": 4.6, "ac": 0.9}
TABLE_CASES: dict[str, tuple[str | bytes, tuple[str, ...]]] = {
    "not_json": ("{not json", ("not valid JSON", "line 1 column 2")),
    "empty": ("", ("not valid JSON",)),
    "deeply_nested": ("[" * 100_000 + "]" * 100_000, ("not valid JSON", "nested too deeply")),
    "number_of_5000_digits": ('{"energies": {"mac": ' + "9" * 5000 + ', "ac": 1}}', ("not valid JSON", "digits")),
    "integer_beyond_float": (json.dumps({"energies": {"mac": 10**400, "ac": 1}}), ("energies.mac", "401 digits")),
    "not_utf8": (b'{"energies": {"mac": 1, "ac": 1}, "name": "\xff\xfe"}', ("not UTF-8",)),
    "list": ("[1, 2]", ("JSON object",)),
    "no_energies": (json.dumps({"name": "t"}), ('"energies"',)),
    "energies_list": (json.dumps({"energies": [4.6, 0.9]}), ('"energies"',)),
    "missing_mac": (json.dumps({"energies": {"ac": 0.9}}), ("missing energy 'mac'",)),
    "unknown_energy": (json.dumps({"energies": {**GOOD, "macs": 1}}), ("unknown energy 'macs'",)),
    "unknown_field": (json.dumps({"energies": GOOD, "primitive": {}}), ('unknown field "primitive"',)),
    "repeated_key": ('{"energies": {"mac": 4.6, "mac": 0.1, "ac": 0.9}}', ('key "mac" appears twice',)),
    "mac_text": (json.dumps({"energies": {"mac": "4.6", "ac": 0.9}}), ("number of pJ", '"4.6"')),
    "mac_bool": (json.dumps({"energies": {"mac": True, "ac": 0.9}}), ("number of pJ", "true")),
    "mac_null": (json.dumps({"energies": {"mac": None, "ac": 0.9}}), ("number of pJ", "null")),
    "ac_negative": (json.dumps({"energies": {"mac": 4.6, "ac": -1}}), (">= 0", "-1")),
    "mac_nan": ('{"energies": {"mac": NaN, "ac": 0.9}}', ("finite", "nan")),
    "mac_infinity": ('{"energies": {"mac": Infinity, "ac": 0.9}}', ("finite", "inf")),
    "mac_overflows": ('{"energies": {"mac": 1e400, "ac": 0.9}}', ("finite", "inf")),
    "entry_without_pj": (json.dumps({"energies": {"mac": {"source": "x"}, "ac": 0.9}}), ('missing "pj"',)),
    "entry_unknown_field": (json.dumps({"energies": {"mac": {"pj": 1, "joules": 2}, "ac": 0.9}}),
                            ("unknown field 'joules'",)),
    "entry_source_number": (json.dumps({"energies": {"mac": {"pj": 1, "source": 3}, "ac": 0.9}}),
                            ('"source" must be text',)),
    "name_number": (json.dumps({"energies": GOOD, "name": 3}), ("'name' must be text",)),
    "primitives_list": (json.dumps({"energies": GOOD, "primitives": [1]}), ('"primitives" must be an object',)),
    "primitive_negative": (json.dumps({"energies": GOOD, "primitives": {"add": -0.1}}), ("primitives.add", ">= 0")),
    "too_large": (json.dumps({"energies": GOOD, "description": "x" * (2 << 20)}), ("larger than",)),
}


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_energy_refuses_a_bad_table(inputs, tmp_path, case):
    content, fragments = TABLE_CASES[case]
    table = tmp_path / f"{case}.json"
    table.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = snapshot(tmp_path)
    _refused(invoke("energy", inputs["digits"], "--data", "digits", "--table", table), table, *fragments,
             before=before, folder=tmp_path)


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_energy_refuses_a_table_that_is_no_file(inputs, tmp_path, kind):
    table = tmp_path / "table.json"
    if kind == "folder":
        table.mkdir()
    elif kind == "fifo":
        os.mkfifo(table)
    else:
        table.symlink_to("/dev/zero")
    before = snapshot(tmp_path)
    _refused(invoke("energy", inputs["digits"], "--data", "digits", "--table", table), table, "not a regular file",
             before=before, folder=tmp_path)


# --- train --init and --resume -------------------------------------------------------------------

def _train(tmp_path: Path, *extra) -> list:
    data = tmp_path / "data.npz"
    if not data.exists():
        np.savez(data, x=_good_x(10), y=np.arange(10))   # 10 classes
    return ["train", "--data", data, "--epochs", "1", "-o", tmp_path / "out" / "m.onnx", "--json", *extra]


def _init_case(case: str, inputs: dict[str, Path], path: Path) -> tuple[str, ...]:
    """Write a bad init file for `case` at `path`; returns the fragments its refusal must hold."""
    from safetensors.torch import load_file

    state = load_file(str(inputs["state10"]))
    if case == "text":
        path.write_text("these are no weights")
        return ("not a readable safetensors file",)
    if case == "empty":
        path.write_bytes(b"")
        return ("not a readable safetensors file",)
    if case == "npz":
        path.write_bytes(_good_npz_bytes())
        return ("not a readable safetensors file",)
    if case == "other_classes":
        path.write_bytes(inputs["state5"].read_bytes())
        return ("'fc.weight' has shape (5, 1024)", "the model needs (10, 1024)")
    if case == "per_channel_lambdas":   # the run trains one lambda per layer
        path.write_bytes(inputs["per_channel"].read_bytes())
        return ("'act1.clip' has shape (16,)", "the model needs ()")
    if case == "transposed_conv":
        state["conv2.weight"] = state["conv2.weight"].transpose(0, 1).contiguous()
        save_file(state, str(path))
        return ("'conv2.weight' has shape (16, 32, 3, 3)", "the model needs (32, 16, 3, 3)")
    if case == "missing_tensors":
        save_file({"fc.bias": state["fc.bias"]}, str(path))
        return ("no tensor for conv1.weight",)
    if case == "integer_weights":
        state["conv1.weight"] = state["conv1.weight"].to(torch.int32)
        save_file(state, str(path))
        return ("'conv1.weight' has dtype int32", "floating dtype (float32)")
    if case == "bool_weights":
        state["fc.weight"] = state["fc.weight"] > 0
        save_file(state, str(path))
        return ("'fc.weight' has dtype bool",)
    if case == "nan_weights":
        state["conv3.weight"][0, 0, 0, 0] = float("nan")
        save_file(state, str(path))
        return ("'conv3.weight' holds NaN or infinite values",)
    if case == "inf_running_var":
        state["bn1.running_var"][0] = float("inf")
        save_file(state, str(path))
        return ("'bn1.running_var' holds NaN or infinite values",)
    if case == "metadata_not_json":
        save_file(state, str(path), metadata={"ann2snn": "{nope"})
        return ('"ann2snn" metadata is not valid JSON', "line 1 column 2")
    if case == "metadata_deeply_nested":
        save_file(state, str(path), metadata={"ann2snn": "[" * 50_000 + "]" * 50_000})
        return ('"ann2snn" metadata is not valid JSON', "RecursionError")
    if case == "metadata_a_list":
        save_file(state, str(path), metadata={"ann2snn": "[1, 2]"})
        return ('"ann2snn" metadata must be a JSON object', "list")
    if case == "garbage_onnx":
        path.write_bytes(b"\x08\x07 garbage")
        return ("a truncated or corrupt ONNX file",)
    raise AssertionError(case)


INIT_CASES = ["text", "empty", "npz", "other_classes", "per_channel_lambdas", "transposed_conv", "missing_tensors",
              "integer_weights", "bool_weights", "nan_weights", "inf_running_var", "metadata_not_json",
              "metadata_deeply_nested", "metadata_a_list", "garbage_onnx"]


@pytest.mark.parametrize("case", INIT_CASES)
def test_train_refuses_a_bad_init_file(inputs, tmp_path, case):
    init = tmp_path / ("init.onnx" if case == "garbage_onnx" else "init.safetensors")
    fragments = _init_case(case, inputs, init)
    args = _train(tmp_path, "--init", init)
    before = snapshot(tmp_path)
    _refused(invoke(*args), init, *fragments, before=before, folder=tmp_path)


def _run_config(tmp_path: Path) -> dict:
    """The configuration `_train(tmp_path, "--resume")` runs with, as its checkpoint stores it."""
    from dataclasses import asdict

    from ann2snn.train import TrainConfig

    return asdict(TrainConfig(data=str(tmp_path / "data.npz"), timesteps=3, epochs=1, resume=True,
                              output=str(tmp_path / "out" / "m.safetensors"), onnx=str(tmp_path / "out" / "m.onnx")))


def _checkpoint_case(case: str, inputs: dict[str, Path], path: Path) -> tuple[str, ...]:
    from safetensors.torch import load_file

    weights = "state5" if case == "tensor_shapes" else "state10"
    state = {f"model.{k}": v for k, v in load_file(str(inputs[weights])).items()}
    state["rng.torch"] = torch.get_rng_state()
    meta = {"format": "ann2snn-checkpoint", "format_version": 1, "epoch": 1, "config": _run_config(path.parents[1]),
            "history": [], "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "rng": {}}
    if case == "tensor_shapes":   # the same run's settings, another model's tensors
        save_file(state, str(path), metadata={"ann2snn": json.dumps(meta)})
        return ("'fc.bias' has shape (5,)", "the model needs (10,)")
    if case == "optimizer_groups":
        save_file(state, str(path), metadata={"ann2snn": json.dumps(meta)})
        return ("cannot restore the training checkpoint", "ValueError")
    if case == "garbage":
        path.write_bytes(b"garbage")
        return ("not a readable safetensors file",)
    if case == "metadata_a_list":
        save_file(state, str(path), metadata={"ann2snn": "[]"})
        return ("must be a JSON object",)
    if case == "optimizer_a_list":
        save_file(state, str(path), metadata={"ann2snn": json.dumps({**meta, "optimizer": []})})
        return ("incomplete training checkpoint", "TypeError")
    if case == "config_a_list":
        save_file(state, str(path), metadata={"ann2snn": json.dumps({**meta, "config": []})})
        return ("incomplete training checkpoint", "config an object")
    if case == "epoch_text":
        save_file(state, str(path), metadata={"ann2snn": json.dumps({**meta, "epoch": "1"})})
        return ("incomplete training checkpoint", "epoch must be an integer")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["garbage", "metadata_a_list", "optimizer_a_list", "config_a_list", "epoch_text",
                                  "tensor_shapes", "optimizer_groups"])
def test_train_resume_refuses_a_damaged_checkpoint(inputs, tmp_path, case):
    ckpt = tmp_path / "out" / "m.safetensors.ckpt"
    ckpt.parent.mkdir()
    fragments = _checkpoint_case(case, inputs, ckpt)
    args = _train(tmp_path, "--resume")
    before = snapshot(tmp_path)
    _refused(invoke(*args), ckpt, *fragments, before=before, folder=tmp_path)


def test_train_refuses_an_output_it_cannot_write(tmp_path):
    data = tmp_path / "data.npz"
    np.savez(data, x=_good_x(10), y=np.arange(10))
    out = tmp_path / "data.npz" / "m.onnx"   # under a file, not a folder
    before = snapshot(tmp_path)
    _refused(invoke("train", "--data", data, "--epochs", "1", "-o", out), out, "is not a folder",
             before=before, folder=tmp_path)


# --- convert --calib -----------------------------------------------------------------------------

CALIB_SHAPES = {"channels": (3, 8, 8), "spatial": (1, 16, 16)}


def test_check_input_shape_names_the_expected_and_found_shapes():
    check_input_shape("d.npz", (1, 8, 8), ["batch", 1, 8, 8][1:])
    check_input_shape("d.npz", (1, 5, 7), [1, "h", None])   # free dimensions take any size
    with pytest.raises(DataError, match=r"d.npz: the model takes samples of shape \(1, 8, 8\), "
                                                       r"found samples of shape \(3, 8, 8\)"):
        check_input_shape("d.npz", (3, 8, 8), [1, 8, 8])
    with pytest.raises(DataError, match=r"\(1, any, any\).*\(1, 8\)"):
        check_input_shape("d.npz", (1, 8), [1, "h", "w"])


@pytest.mark.parametrize("case", sorted(CALIB_SHAPES))
def test_convert_refuses_calib_data_of_the_wrong_shape(inputs, tmp_path, case):
    shape = CALIB_SHAPES[case]
    bad = tmp_path / f"{case}.npz"
    np.savez(bad, x=_good_x(shape=shape), y=Y4)
    before = snapshot(tmp_path)
    _refused(invoke("convert", inputs["onnx"], "-T", "3", "--calib", bad, "-o", tmp_path / "m.snn"), bad,
             "takes samples of shape (1, 8, 8)", f"found samples of shape {shape}", before=before, folder=tmp_path)


# --- the real command in a subprocess ------------------------------------------------------------

def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ann2snn", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def _assert_one_line(done: subprocess.CompletedProcess, *fragments: str) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ann2snn: error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_subprocess_a_corrupt_image_read_by_a_worker(inputs, tmp_path):
    root = _folder(tmp_path / "images")
    bad = root / "b" / "bad.png"
    _truncated_png(bad)
    before = snapshot(tmp_path)
    done = _run("eval", inputs["rgb"], "--data", root, "--workers", "1")   # with the progress bar on
    line = _assert_one_line(done, str(bad), "cannot read image", "truncated")
    assert "DataLoader worker" not in line
    assert snapshot(tmp_path) == before


def test_subprocess_nan_inputs_in_a_file_with_a_newline_in_its_name(inputs, tmp_path):
    bad = tmp_path / "two\nlines.npz"
    np.savez(bad, x=np.full((4, 1, 8, 8), np.nan), y=Y4)
    before = snapshot(tmp_path)
    _assert_one_line(_run("energy", inputs["digits"], "--data", bad), str(bad).replace("\n", "\\n"), "finite")
    assert snapshot(tmp_path) == before
