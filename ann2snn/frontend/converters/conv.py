"""Conv (1-D and 2-D; groups, depthwise, strides, dilations, pads, auto_pad) -> nn.Conv1d / nn.Conv2d.

A constant-0 Pad in front of a Conv (TensorFlow's SAME padding written out) becomes the
convolution's own zero padding: the same numbers, one op fewer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import add_converter
from .utils import native_padding, spatial_padding, take_pad, torch_pad

_CONVS = {3: nn.Conv1d, 4: nn.Conv2d}


@add_converter("Conv", 11)
@add_converter("Conv", 22)
def convert_conv(ctx) -> list:
    x = ctx.dynamic(0)
    weight = ctx.constant(1, "weight")
    bias = ctx.constant(2, "bias")
    shape = ctx.shape(x)
    if len(shape) not in _CONVS:
        ctx.fail(f"a rank-{len(shape)} input is not supported (1-D and 2-D convolutions only)")
    spatial = len(shape) - 2
    kernel = list(weight.shape[2:])
    if ctx.attr("kernel_shape") not in (None, kernel):
        ctx.unsupported("kernel_shape", ctx.attr("kernel_shape"), f"the weight's kernel is {kernel}")
    strides = ctx.attr("strides") or [1] * spatial
    dilations = ctx.attr("dilations") or [1] * spatial
    groups = ctx.attr("group")
    if shape[1] != weight.shape[1] * groups:
        ctx.fail(f"input has {shape[1]} channels; weight {list(weight.shape)} with group={groups} expects "
                 f"{weight.shape[1] * groups}")
    pairs = spatial_padding(ctx, shape[2:], kernel, strides, dilations)
    x, pairs = take_pad(ctx, x, pairs, lambda pad, _: pad.mode == "constant" and pad.value == 0)
    padding = native_padding(pairs)
    if padding is None:  # asymmetric: pad explicitly with zeros first
        x = ctx.call_function(F.pad, x, torch_pad(pairs), suffix="_pad")
        padding = (0,) * spatial
    conv = _CONVS[len(shape)](shape[1], weight.shape[0], kernel, stride=strides, padding=padding,
                              dilation=dilations, groups=groups, bias=bias is not None, device="meta")
    conv.weight = nn.Parameter(torch.from_numpy(weight.copy()))   # meta: no random weights first (as _linear)
    if bias is not None:
        conv.bias = nn.Parameter(torch.from_numpy(bias.copy()))
    return [ctx.call_module(conv, x)]
