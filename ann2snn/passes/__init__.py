"""The compiler's passes, in the order convert() runs them; each maps a GraphModule to one."""
from .calibrate import float_activations_to_sites
from .fold_bn import fold_batch_norm
from .move_max_pool import move_max_pool_before_sites
from .place_neurons import place_neurons
from .shift_bias import shift_bias
from .trace import trace

__all__ = ["trace", "float_activations_to_sites", "fold_batch_norm", "shift_bias", "move_max_pool_before_sites", "place_neurons"]
