"""ann2snn: compile trained ANNs into error-free, ultra-low-latency bit-serial SNNs."""
from .version import __version__
from .compiler import convert
from .quant import QuantClippedActivation
from .snn import SNN, SNNOutput, load_snn
from .export import export_onnx
from .prepare import prepare, spike_penalty


__all__ = ["__version__", "convert", "load_snn", "SNN", "SNNOutput", "QuantClippedActivation",
           "export_onnx", "prepare", "spike_penalty"]
