"""ann2snn: compile trained ANNs into error-free, ultra-low-latency bit-serial SNNs."""
__version__ = "0.1.0"

from .compiler import convert  # noqa: E402
from .quant import QuantClippedActivation  # noqa: E402
from .snn import SNN, SNNOutput  # noqa: E402
from .artifact import load_snn  # noqa: E402
from .export import export_onnx  # noqa: E402
from .prepare import prepare, spike_penalty  # noqa: E402


__all__ = ["__version__", "convert", "load_snn", "SNN", "SNNOutput", "QuantClippedActivation",
           "export_onnx", "prepare", "spike_penalty"]
