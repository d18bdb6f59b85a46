"""moce_kernels: the ops of the MoCE-IR engine.

Each op lives in its own folder with a pure-PyTorch ``reference.py`` (its definition); the
public function validates arguments and runs the backend chosen by ``backend=``.
"""

from moce_kernels._backend import BACKENDS
from moce_kernels._extension import build_summary
from moce_kernels.attention_projection_fold import attention_projection_fold
from moce_kernels.channel_attention_map import channel_attention_map
from moce_kernels.combine import combine
from moce_kernels.dispatch import dispatch
from moce_kernels.dispatch_pointwise import dispatch_pointwise
from moce_kernels.dwconv_gate_pointwise import dwconv_gate_pointwise
from moce_kernels.dwconv_gelu_gate import dwconv_gelu_gate
from moce_kernels.fused_pointwise import fused_pointwise
from moce_kernels.grouped_dwconv import grouped_dwconv, pack_dwconv_weights, pack_rows
from moce_kernels.grouped_layernorm2d import grouped_layernorm2d
from moce_kernels.grouped_patch_fft_conv import grouped_patch_fft_conv
from moce_kernels.grouped_pointwise import grouped_pointwise, pack_pointwise_weights
from moce_kernels.layernorm2d import layernorm2d
from moce_kernels.patch_fft_conv import patch_fft_conv
from moce_kernels.pointwise_combine import pointwise_combine
from moce_kernels.qk_gram import qk_gram
from moce_kernels.route import RoutingPlan, route

__all__ = [
    "BACKENDS",
    "RoutingPlan",
    "attention_projection_fold",
    "build_summary",
    "channel_attention_map",
    "combine",
    "dispatch",
    "dispatch_pointwise",
    "dwconv_gate_pointwise",
    "dwconv_gelu_gate",
    "fused_pointwise",
    "grouped_dwconv",
    "grouped_layernorm2d",
    "grouped_patch_fft_conv",
    "grouped_pointwise",
    "layernorm2d",
    "pack_dwconv_weights",
    "pack_pointwise_weights",
    "pack_rows",
    "patch_fft_conv",
    "pointwise_combine",
    "qk_gram",
    "route",
]
__version__ = "0.1.0"
