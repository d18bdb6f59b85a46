"""grouped_pointwise's autograd formula, for the Triton (``moce_triton::``) ops: gradients of x,
weight and bias; the offsets and channel counts are not differentiable. The same formula as
grouped_dwconv's (``moce_kernels._grouped_autograd``).
"""

from moce_kernels._grouped_autograd import make_backward, setup_context

__all__ = ["make_backward", "setup_context"]
