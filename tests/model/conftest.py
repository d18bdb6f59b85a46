import pytest
import torch

import moceir


@pytest.fixture(scope="module")
def small_model():
    """MoCE-IR-S with every parameter perturbed, so no weight sits at a trivial init value."""
    torch.manual_seed(0)
    model = moceir.build_model("moce_ir_s", backend="reference")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model
