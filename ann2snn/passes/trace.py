"""Import a PyTorch model as a torch.fx graph: the entry of the compiler for PyTorch models."""
from __future__ import annotations

import copy

from torch import fx, nn

from .graph_utils import set_module, site_nodes


class SiteTracer(fx.Tracer):
    """Keeps torch.nn modules and ann2snn's own modules (sites, neurons, QDQ) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m).__module__.startswith("ann2snn.") or super().is_leaf_module(m, module_qualified_name)


def unshare_sites(gm: fx.GraphModule) -> fx.GraphModule:
    """One module per activation site: a module called at k places becomes k copies.

    Each site becomes its own neuron layer, with its own name in reports and spike counts.
    """
    seen: set[str] = set()
    for node in site_nodes(gm):
        if node.target in seen:
            copy_index = 1
            while any(n.target == f"{node.target}_{copy_index}" for n in gm.graph.nodes):
                copy_index += 1
            target = f"{node.target}_{copy_index}"
            set_module(gm, target, copy.deepcopy(gm.get_submodule(node.target)))
            node.target = target
        seen.add(node.target)
    gm.recompile()
    return gm


def trace(model: nn.Module) -> fx.GraphModule:
    """A fresh GraphModule of `model` in eval mode, one module per site; `model` is not modified."""
    model = copy.deepcopy(model).eval()
    if not isinstance(model, fx.GraphModule):
        model = fx.GraphModule(model, SiteTracer().trace(model), type(model).__name__)
    return unshare_sites(model)
