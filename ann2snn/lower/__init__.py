"""The two ways to run a converted SNN (METHOD.md section 7); both return the same logits and counts."""
from .evaluator import TimeFoldedNeuron, lower_to_evaluator
from .signal import Signal
from .simulator import lower_to_simulator

__all__ = ["Signal", "lower_to_simulator", "lower_to_evaluator", "TimeFoldedNeuron"]
