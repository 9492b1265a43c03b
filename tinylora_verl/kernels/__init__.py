"""The CPU kernels: one-pass C++ passes of the adapter's update over CPU activations, the fused linear and the
q/k/v, gate/up group as C++ autograd nodes, and the Gram products of the injection's SVDs.

The core calls them through this interface only: :func:`load` (the policy ``auto``/``on``/``off``), the predicates
:func:`takes_factors`, :func:`reads`, :func:`applies`, the ops of :class:`Kernels`, and :class:`GroupNodes`. GPU
tensors never reach them.
"""

from .groups import GroupInputs, GroupNodes, group_linear
from .loader import MAX_RANK, MODES, OPS, SOURCES, Kernels, applies, build_directory, build_name, load, reads, \
    takes_factors

__all__ = ["GroupInputs", "GroupNodes", "Kernels", "MAX_RANK", "MODES", "OPS", "SOURCES", "applies",
           "build_directory", "build_name", "group_linear", "load", "reads", "takes_factors"]
