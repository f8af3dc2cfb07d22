"""Compile: the passes from a quantized ANN to an SNN (trace, calibrate, fold BN, shift bias, place neurons).

Each pass maps a GraphModule to one; compiler.py runs them in order.
"""
from .calibrate import float_activations_to_sites
from .compiler import compile_graph, compile_source, convert
from .fold_bn import fold_batch_norm
from .move_max_pool import move_max_pool_before_sites
from .place_neurons import place_neurons
from .qdq_to_sites import qdq_to_sites
from .shift_bias import shift_bias
from .trace import trace

__all__ = ["compile_graph", "compile_source", "convert", "float_activations_to_sites", "fold_batch_norm",
           "move_max_pool_before_sites", "place_neurons", "qdq_to_sites", "shift_bias", "trace"]
