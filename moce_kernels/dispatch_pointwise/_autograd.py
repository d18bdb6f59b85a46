"""dispatch_pointwise's autograd formula, for the Triton (``moce_triton::``) ops: gradients of x,
weight and bias; the plan's tensors and the widths are not differentiable. The grouped ops'
formula (``moce_kernels._grouped_autograd``), with the plan's sorted images and inverse as the
index tensors.
"""

from moce_kernels._grouped_autograd import make_backward, setup_context

__all__ = ["make_backward", "setup_context"]
