"""Starting from pretrained weights (issue 17.3): the zoo's ImageNet models build torchvision's
module tree, so a torchvision-style state dict (the names `conv1.weight`, `layer1.0.bn1.running_mean`,
... `fc.weight`), saved as safetensors, is what `ann2snn train --init` loads by name.
"""
from __future__ import annotations

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ann2snn import models
from hostile import invoke

# torchvision's state-dict sizes (entries, BN counters included) of the same architectures
TORCHVISION_ENTRIES = {"resnet18": 122, "resnet34": 218, "vgg16": 97, "mobilenetv2": 314}


def test_the_zoo_builds_torchvisions_module_trees():
    for name, entries in TORCHVISION_ENTRIES.items():
        keys = list(models.build_model(name, 1000).state_dict())
        assert len(keys) == entries, name
        assert keys[-2:] in (["fc.weight", "fc.bias"], ["classifier.6.weight", "classifier.6.bias"],
                             ["classifier.1.weight", "classifier.1.bias"]), name


def test_train_starts_from_a_torchvision_style_state_dict(tmp_path):
    for split in ("train", "val"):
        for label, color in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200)]):
            folder = tmp_path / "images" / split / f"class{label}"
            folder.mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (40, 36), tuple(c + 10 * k for c in color)).save(folder / f"{k}.png")
    generator = torch.Generator().manual_seed(0)
    pretrained = {name: (torch.randn(t.shape, generator=generator) * 0.05 if t.is_floating_point() else t)
                  for name, t in models.build_model("resnet18", 3).state_dict().items()}
    pretrained = {k: (v.abs() + 0.5 if k.endswith("running_var") else v) for k, v in pretrained.items()}
    init = tmp_path / "resnet18.safetensors"
    save_file(pretrained, str(init))
    out = tmp_path / "r18.onnx"
    result = invoke("train", "--model", "resnet18", "--data", tmp_path / "images", "--init", init, "-T", "3",
                    "--epochs", "1", "--batch-size", "3", "--lr", "1e-9", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    trained = load_file(str(tmp_path / "r18.safetensors"))
    for name in ("conv1.weight", "layer3.1.conv2.weight", "fc.weight"):   # started from the init, barely moved
        torch.testing.assert_close(trained[name], pretrained[name], rtol=0, atol=1e-5)
