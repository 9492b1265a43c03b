"""Other routings of an adapter's modules, for comparisons only (``inject_tinylora`` installs the defaults).

``reroute(adapter, fused=False)`` puts every module on the hook path (what linears with their own forward get),
``share_inputs=False`` gives each module its own ``x V`` GEMM, ``group_nodes=False`` runs q/k/v and gate/up as a node
each instead of one per group. The overhead benchmark times them beside the default; tests check they agree.
"""

from __future__ import annotations

from tinylora_verl.core.forward import AdapterForwards


def reroute(adapter, fused: bool = True, share_inputs: bool = True, group_nodes: bool = True) -> None:
    """Re-install ``adapter`` 's forwards with these options (``adapter.remove()`` still takes them off)."""
    adapter.forwards.remove()
    adapter.forwards = AdapterForwards(adapter.routing(), fused=fused, share_inputs=share_inputs,
                                       group_nodes=group_nodes)


__all__ = ["reroute"]
