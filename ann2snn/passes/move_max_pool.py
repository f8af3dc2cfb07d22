"""Pass: MaxPool after an activation site moves before it (METHOD.md section 3).

max commutes with the monotone q(), so pooling the potentials before firing is exact, and the
spikes then never need a max over spike trains.
"""
from __future__ import annotations

from torch import fx

from .graph_utils import MAX_POOLS, conversion_report, is_instance_node, site_nodes


def move_max_pool_before_sites(gm: fx.GraphModule) -> fx.GraphModule:
    report = conversion_report(gm)
    sites = set(site_nodes(gm))
    for pool in list(gm.graph.nodes):
        if not is_instance_node(gm, pool, MAX_POOLS):
            continue
        site = pool.args[0]
        if site not in sites or len(site.users) != 1:
            continue
        potential = site.args[0]
        for user in list(pool.users):
            user.replace_input_with(pool, site)
        pool.replace_input_with(site, potential)
        site.replace_input_with(potential, pool)
        pool.append(site)  # the site now runs after the pool
        report["rewrites"].append({"pass": "move_max_pool_before_sites", "max_pool": pool.target,
                                   "site": site.target})
    gm.graph.lint()
    gm.recompile()
    return gm
