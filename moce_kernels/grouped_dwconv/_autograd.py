"""grouped_dwconv's autograd formula, shared by the compiled (``moce::``) and Triton
(``moce_triton::``) ops: gradients of x, weight and bias; the offsets, channels and kernel sizes
are not differentiable. The same formula as grouped_pointwise's (``moce_kernels._grouped_autograd``).
"""

from moce_kernels._grouped_autograd import make_backward, setup_context

__all__ = ["make_backward", "setup_context"]
