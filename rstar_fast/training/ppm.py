"""PPM training: a one-output sequence classifier on step preference pairs.

The PPM starts from the policy's weights, as in rStar-Math: the causal LM folder is loaded as
`AutoModelForSequenceClassification(num_labels=1)`, so the backbone is shared and only the
score head is new. TRL's RewardTrainer optimises the pairwise loss
`-log sigmoid(r(prompt + pos) - r(prompt + neg))`. The engines read the raw score at the last
token of prompt + step and show `tanh(raw / 5)`; the pairs are tokenized here, without an EOS
appended, so training scores exactly the token the engines score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rstar_fast.training.common import (
    LOSS_LOG_FILE,
    TrainHParams,
    TrainResult,
    _opt,
    add_step_tokens,
    load_tokenizer,
    make_loss_logger,
    progress_bars,
    quiet_transformers,
    resolve_init,
    run_trainer,
    set_pad_token,
    torch_dtype,
    trainer_kwargs,
)
from rstar_fast.training.data import (
    PreferencePair,
    TrainingConfigError,
    TrainingDataError,
    load_preference_pairs,
)

log = logging.getLogger(__name__)


@dataclass
class PPMHParams(TrainHParams):
    """PPM defaults from the reference's RM script: lr 7e-6, 2 epochs, per-device batch 16 with
    4 accumulation steps on 8 GPUs (global 512, as in the paper), max length 2048."""

    batch_size: int = field(
        default=512, metadata=_opt("global batch of pairs (per-device x devices x accumulation)")
    )
    per_device_batch_size: int = field(default=16, metadata=_opt("pairs per device and step"))
    append_eos: bool = field(
        default=False, metadata=_opt("append EOS to prompt+step before scoring (the engines score without it)")
    )
    center_rewards_coefficient: float = field(
        default=0.0, metadata=_opt("weight of the mean-zero reward penalty (0: off, TRL suggests 0.01)")
    )


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, max_length: int, append_eos: bool = False):
    """Token ids of prompt+pos and prompt+neg per pair; pairs over max_length are dropped.

    Returns (dataset with chosen_ids/rejected_ids columns, number dropped).
    """
    from datasets import Dataset

    suffix = tokenizer.eos_token if append_eos else ""
    chosen = tokenizer([p.prompt + p.pos + suffix for p in pairs])["input_ids"]
    rejected = tokenizer([p.prompt + p.neg + suffix for p in pairs])["input_ids"]
    keep = [i for i in range(len(pairs)) if len(chosen[i]) <= max_length and len(rejected[i]) <= max_length]
    data = Dataset.from_dict(
        {"chosen_ids": [chosen[i] for i in keep], "rejected_ids": [rejected[i] for i in keep]}
    )
    return data, len(pairs) - len(keep)


def load_ppm_model(source: Path | str, hp: TrainHParams):
    """A one-label sequence classifier from a causal LM (new score head), from a PPM folder,
    or from the reference's released layout (causal LM + value_head.*, whose weights become
    the score head's)."""
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(source), num_labels=1, dtype=torch_dtype(hp)
            )
        except (OSError, ValueError) as e:
            raise TrainingConfigError(f"{source}: cannot load as a sequence classifier: {e}") from None
    if Path(source).is_dir():
        _adopt_value_head(Path(source), model)
    return model


def _adopt_value_head(folder: Path, model) -> None:
    import torch

    from rstar_fast.engines.base import EngineError
    from rstar_fast.engines.hf import VALUE_HEAD_FILES, load_value_head

    if not any((folder / f).is_file() for f in VALUE_HEAD_FILES):
        return
    try:
        head = load_value_head(folder, model.config.hidden_size).summary
    except EngineError as e:
        raise TrainingConfigError(str(e)) from None
    with torch.no_grad():
        model.score.weight.copy_(head.weight.to(model.score.weight.dtype))
    bias = float(head.bias.detach()[0])
    if bias and model.score.bias is None:
        # the pairwise loss does not see a constant: training is unaffected, scores shift by it
        log.warning("%s: the value head's bias (%.4g) is not kept: the sequence classifier's score head has "
                    "none, so the trained PPM's raw scores are shifted by it", folder, bias)


def build_ppm_trainer(
    pairs: list[PreferencePair],
    init_source: Path | str,
    out_dir: str | Path,
    hp: PPMHParams,
    *,
    data_name: str = "pairs",
):
    """The RewardTrainer for a run, ready to `.train()`; returns (trainer, loss logger, pairs dropped)."""
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    out_dir = Path(out_dir)
    set_seed(hp.seed)  # the new score head's initialisation
    tokenizer = load_tokenizer(init_source)
    model = load_ppm_model(init_source, hp)
    if hp.add_step_tokens:
        add_step_tokens(tokenizer, model)
    set_pad_token(model, tokenizer)
    dataset, dropped = tokenize_pairs(pairs, tokenizer, hp.max_length, hp.append_eos)
    if len(dataset) == 0:
        raise TrainingDataError(
            f"{data_name}: all {len(pairs)} pairs are longer than max_length={hp.max_length} tokens"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    config = RewardConfig(
        **trainer_kwargs(hp, out_dir),
        max_length=None,  # filtered above, where the count is kept
        center_rewards_coefficient=hp.center_rewards_coefficient or None,
        disable_dropout=True,
    )
    logger = make_loss_logger(out_dir / LOSS_LOG_FILE)
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[logger]
    )
    return trainer, logger, dropped


def train_ppm(
    pairs_path: str | Path, init_path: str | Path | None, out_dir: str | Path, **hparams: Any
) -> TrainResult:
    """Train a PPM on `{prompt, pos, neg, ...}` pairs, starting from `init_path`'s weights.

    `init_path` is the policy (a causal LM folder), an existing PPM folder, or None / "tiny" for
    a fresh tiny model. `hparams` are PPMHParams fields. Writes the checkpoint (an ordinary HF
    folder the engines load as `hf:OUT`), OUT/loss_log.jsonl and OUT/train_result.json.
    """
    hp = PPMHParams.from_kwargs(**hparams)
    pairs = load_preference_pairs(pairs_path)  # bad data fails before any model is loaded
    with resolve_init(init_path, hp) as (source, init_name), progress_bars(hp.progress):
        trainer, logger, dropped = build_ppm_trainer(pairs, source, out_dir, hp, data_name=str(pairs_path))
        return run_trainer(
            trainer, logger, kind="ppm", out_dir=Path(out_dir), init=init_name, data_path=Path(pairs_path),
            examples=len(pairs) - dropped, skipped=dropped, hp=hp,
        )
