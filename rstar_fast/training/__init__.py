"""Training: the PPM on preference pairs and the policy on SFT data.

    from rstar_fast.training import train_ppm, train_sft
    train_sft("sft.json", "base_model/", "round_2/policy")          # or init "tiny": from scratch
    train_ppm("pairs.json", "round_2/policy", "round_2/ppm")        # the PPM starts from the policy

Both use the maintained stack (TRL's RewardTrainer and SFTTrainer on transformers' Trainer), so
the same call scales to GPUs under torchrun / accelerate. Heavy imports happen on first use.
"""

from __future__ import annotations

from rstar_fast.training.common import TINY_INIT, TrainHParams, TrainResult, load_train_result
from rstar_fast.training.data import (
    PreferencePair,
    SFTExample,
    TrainingConfigError,
    TrainingDataError,
    TrainingError,
    load_preference_pairs,
    load_sft_examples,
)
from rstar_fast.training.ppm import PPMHParams, train_ppm
from rstar_fast.training.sft import SFT_TEMPLATE, SFTHParams, train_sft

__all__ = [
    "PPMHParams",
    "PreferencePair",
    "SFTExample",
    "SFTHParams",
    "SFT_TEMPLATE",
    "TINY_INIT",
    "TrainHParams",
    "TrainResult",
    "TrainingConfigError",
    "TrainingDataError",
    "TrainingError",
    "load_preference_pairs",
    "load_sft_examples",
    "load_train_result",
    "train_ppm",
    "train_sft",
]
