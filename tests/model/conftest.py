import pytest
import torch

import moceir


def perturbed_model(backend: str = "reference", **overrides) -> moceir.MoCEIR:
    """MoCE-IR-S (``overrides`` of its configuration) with every parameter perturbed (seed 0), so
    no weight sits at a trivial init value."""
    torch.manual_seed(0)
    model = moceir.build_model("moce_ir_s", backend=backend, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def small_model():
    """MoCE-IR-S with every parameter perturbed, so no weight sits at a trivial init value."""
    return perturbed_model()


@pytest.fixture
def exact_fp32():
    """TF32 off: the reference and the kernels then both compute in true fp32 on a GPU."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm
