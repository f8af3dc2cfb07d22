"""Runtime: the SNN, its safe artifact, and its two executors (time-stepped simulation, time-folded evaluation).

The kernels (ann2snn.kernels) run its neurons; scoring.py runs it over a data set.
"""
from .evaluator import TimeFoldedNeuron, lower_to_evaluator
from .metadata import ArtifactHeader, ConversionReport, Source
from .neuron import BitSerialIFNode
from .quant import QuantClippedActivation, QuantDequant
from .signal import Signal
from .simulator import lower_to_simulator
from .snn import SNN, SNNOutput, load_snn

__all__ = ["ArtifactHeader", "BitSerialIFNode", "ConversionReport", "QuantClippedActivation", "QuantDequant", "SNN",
           "SNNOutput", "Signal", "Source", "TimeFoldedNeuron", "load_snn", "lower_to_evaluator", "lower_to_simulator"]
