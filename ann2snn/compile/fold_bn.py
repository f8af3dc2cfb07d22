"""Pass: fold inference BatchNorm into the convolution or linear layer that feeds it."""
from __future__ import annotations

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..ops import CONVS, NORMS
from ..runtime.graph import conversion_report, finish, module_of, set_module


def fold_batch_norm(gm: fx.GraphModule) -> fx.GraphModule:
    """conv -> BN and linear -> BN become one layer with folded weights and bias.

    Only where the conv/linear output feeds the BN alone; any other BN stays, as the per-channel
    affine layer it is in inference.
    """
    report = conversion_report(gm)
    for node in list(gm.graph.nodes):
        norm = module_of(gm, node)
        if not isinstance(norm, NORMS) or not norm.track_running_stats:
            continue
        producer = node.args[0]
        layer = module_of(gm, producer) if isinstance(producer, fx.Node) else None
        if layer is None or len(producer.users) != 1:
            continue
        if isinstance(layer, CONVS):
            fused = fuse_conv_bn_eval(layer.eval(), norm.eval())
        elif isinstance(layer, nn.Linear):
            fused = fuse_linear_bn_eval(layer.eval(), norm.eval())
        else:
            continue
        set_module(gm, producer.target, fused)
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
        report.rewrites.append({"pass": "fold_batch_norm", "batch_norm": node.target, "into": producer.target})
    return finish(gm)
