"""Import a PyTorch model as a torch.fx graph: the entry of the compiler for PyTorch models."""
from __future__ import annotations

import copy

from torch import fx, nn
from torch.nn.utils import parametrize

from ..runtime.neuron import BitSerialIFNode
from ..runtime.quant import QuantClippedActivation, QuantDequant
from ..runtime.graph import set_module

# ann2snn's own modules, which the passes read whole (the zoo, ann2snn.models, is traced through)
OWN_LEAF_MODULES = (QuantClippedActivation, QuantDequant, BitSerialIFNode)


class SiteTracer(fx.Tracer):
    """Keeps torch.nn modules and ann2snn's own modules (sites, neurons, QDQ) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, OWN_LEAF_MODULES) or super().is_leaf_module(m, module_qualified_name)


def _is_stateful(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def unshare_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """One module per call: a site or weighted layer called at k places becomes k copies.

    Each site becomes its own neuron layer, with its own name in reports and spike counts, and
    the passes may rewrite one call's layer (fold a BN, shift a bias) without touching the others.
    """
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        if node.target in seen and _is_stateful(gm.get_submodule(node.target)):
            copy_index = 1
            while any(n.target == f"{node.target}_{copy_index}" for n in gm.graph.nodes):
                copy_index += 1
            target = f"{node.target}_{copy_index}"
            set_module(gm, target, copy.deepcopy(gm.get_submodule(node.target)))
            node.target = target
        seen.add(node.target)
    gm.recompile()
    return gm


def freeze_parametrizations(model: nn.Module) -> None:
    """A parametrized tensor (torch.nn.utils.parametrize: fake-quantized weights, weight norm) becomes the
    plain parameter it computes, in place: the passes and the artifact see the layer's own type and
    the values it uses. Not through parametrize.remove_parametrizations, which edits the module's
    class: a deep copy shares that class with the model it copies, whose weights would vanish."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
        module.__class__ = type(module).__bases__[0]   # the layer's class before parametrize subclassed it
        del module._modules["parametrizations"]
        for name, value in values.items():
            module.register_parameter(name, nn.Parameter(value))


def trace(model: nn.Module) -> fx.GraphModule:
    """A fresh GraphModule of `model` in eval mode, one module per site; `model` is not modified."""
    model = copy.deepcopy(model).eval()
    freeze_parametrizations(model)
    if not isinstance(model, fx.GraphModule):
        model = fx.GraphModule(model, SiteTracer().trace(model), type(model).__name__)
    return unshare_modules(model)
