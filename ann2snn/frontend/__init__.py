"""Frontend: an ONNX file read and checked, imported as a torch.fx graph, one converter per op (registry.py).

QOperator files are rewritten to QDQ first; source.py makes the imported graph the quantized source.
"""
from .importer import inspect_onnx, load_onnx
from .reader import load_checked
from .registry import supported_op_types
from .source import quantized_onnx

__all__ = ["inspect_onnx", "load_checked", "load_onnx", "quantized_onnx", "supported_op_types"]
