"""Verify: the exactness gate (float64 source against the SNN) and the comparison with onnxruntime on the file.

verification.py runs both over streamed inputs and says what passed.
"""
from .gate import ExactGate, check_exact
from .ort_check import compare_with_onnxruntime
from .verification import Verification, verify_snn

__all__ = ["ExactGate", "Verification", "check_exact", "compare_with_onnxruntime", "verify_snn"]
