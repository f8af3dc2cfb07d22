"""One converter per ONNX op; importing this package registers them all."""
from . import activation, arithmetic, batch_norm, conv, linear, misc, pooling, quantize, shape  # noqa: F401
