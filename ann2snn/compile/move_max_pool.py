"""Pass: MaxPool after an activation site moves before it (docs/method.md section 3).

max commutes with the monotone q(), so pooling the potentials before firing is exact, and the
spikes then never need a max over spike trains.
"""
from __future__ import annotations

from torch import fx

from ..ops import MAX_POOLS, functions_of
from ..runtime.graph import conversion_report, is_instance_node, site_nodes


MAX_POOL_FUNCTIONS = functions_of("max_pool")


def _is_max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    return is_instance_node(gm, node, MAX_POOLS) or (node.op == "call_function" and node.target in MAX_POOL_FUNCTIONS)


def _pool_name(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def move_max_pool_before_sites(gm: fx.GraphModule) -> fx.GraphModule:
    """Every max pool (a module or a torch.nn.functional call) directly on a site that feeds it
    alone moves before the site. One that cannot move (the site feeds other nodes too, or the pool
    is not directly on it) is recorded in the report: it pools the potentials after the neuron."""
    report = conversion_report(gm)
    sites = set(site_nodes(gm))
    for pool in list(gm.graph.nodes):
        if not _is_max_pool(gm, pool):
            continue
        site = pool.args[0]
        if site not in sites or len(site.users) != 1:
            reason = "its site feeds other nodes too" if site in sites else "it is not directly on a site"
            report.rewrites.append({"pass": "move_max_pool_before_sites", "max_pool_kept": _pool_name(pool),
                                    "reason": reason})
            continue
        potential = site.args[0]
        for user in list(pool.users):
            user.replace_input_with(pool, site)
        pool.replace_input_with(site, potential)
        site.replace_input_with(potential, pool)
        pool.append(site)  # the site now runs after the pool
        report.rewrites.append({"pass": "move_max_pool_before_sites", "max_pool": _pool_name(pool),
                                "site": site.target})
    gm.graph.lint()
    gm.recompile()
    return gm
