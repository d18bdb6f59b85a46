"""Data for training and evaluation: synthetic degradations, the official dataset layouts,
deterministic training streams and the paper's test sets."""

from moceir.data.benchmarks import Benchmark, BenchmarkImage, crop_to_multiple, official_noise
from moceir.data.degradations import SYNTHETIC_TASKS, degrade
from moceir.data.layouts import (
    TASKS,
    TEST_LAYOUTS,
    TRAIN_LAYOUTS,
    DatasetLayoutError,
    Pair,
    canonical_task,
    find_pairs,
    pair_by_name,
)
from moceir.data.training import TrainingStream, TrainItem, training_items

__all__ = [
    "SYNTHETIC_TASKS",
    "TASKS",
    "TEST_LAYOUTS",
    "TRAIN_LAYOUTS",
    "Benchmark",
    "BenchmarkImage",
    "DatasetLayoutError",
    "Pair",
    "TrainItem",
    "TrainingStream",
    "canonical_task",
    "crop_to_multiple",
    "degrade",
    "find_pairs",
    "official_noise",
    "pair_by_name",
    "training_items",
]
