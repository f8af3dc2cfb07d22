"""ann2snn: compile trained ANNs into error-free, ultra-low-latency bit-serial SNNs."""
from .version import __version__
from .compile.compiler import convert
from .errors import VerificationError
from .pipeline import convert_onnx
from .runtime.quant import QuantClippedActivation
from .runtime.snn import SNN, SNNOutput, load_snn
from .train.export import export_onnx
from .train.prepare import prepare, spike_penalty


__all__ = ["__version__", "convert", "convert_onnx", "VerificationError", "load_snn", "SNN", "SNNOutput",
           "QuantClippedActivation", "export_onnx", "prepare", "spike_penalty"]
