"""moceir: MoCE-IR, the all-in-one image restoration network with complexity experts."""

from moceir.checkpoint import load_checkpoint, save_checkpoint
from moceir.config import CONFIGS, MoCEIRConfig
from moceir.cuda_graphs import DeviceLossScaler, GraphedInference, GraphedTrainStep
from moceir.model import MoCEIR, build_model

__all__ = [
    "CONFIGS",
    "DeviceLossScaler",
    "GraphedInference",
    "GraphedTrainStep",
    "MoCEIR",
    "MoCEIRConfig",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
]
__version__ = "0.1.0"
