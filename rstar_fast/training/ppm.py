"""PPM training: a one-output sequence classifier on step preference pairs.

The PPM starts from the policy's weights, as in rStar-Math: the causal LM folder is loaded as
`AutoModelForSequenceClassification(num_labels=1)`, so the backbone is shared and only the
score head is new. TRL's RewardTrainer optimises the pairwise loss
`-log sigmoid(r(prompt + pos) - r(prompt + neg))`, weighted and summed as the reference's
`RMTrainer` does: a pair from a node with P positives and N negatives weighs 1 / (P * N) (1 /
(P + N) when one side is empty), so every node of a tree counts alike whatever its number of
pairs. As in the reference's value head, a new score head starts near zero (normal, mean 5e-7,
std 1e-6) and sees its input through dropout 0.1 while training. The engines read the raw score
at the last token of prompt + step and show `tanh(raw / 5)`; the pairs are tokenized here,
without an EOS appended, so training scores exactly the token the engines score.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rstar_fast.training.common import (
    LOSS_LOG_FILE,
    REFERENCE_PPM_TOKENS,
    TrainHParams,
    TrainResult,
    _opt,
    add_step_tokens,
    batch_layout,
    check_devices,
    check_out,
    gpus_per_process,
    load_tokenizer,
    make_loss_logger,
    model_file_errors,
    progress_bars,
    quiet_transformers,
    require_training_stack,
    resolve_init,
    run_trainer,
    set_pad_token,
    torch_dtype,
    trainer_kwargs,
    whole,
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
    head_dropout: float = field(
        default=0.1, metadata=_opt("dropout on the score head's input while training (the reference's value head)")
    )
    center_rewards_coefficient: float = field(
        default=0.0, metadata=_opt("weight of the mean-zero reward penalty (0: off, TRL suggests 0.01)")
    )
    eval_fraction: float = field(
        default=0.05, metadata=_opt("share of the pairs held out to evaluate on, split as the reference splits "
                                    "them (shuffled with the seed); 0: train on all")
    )
    eval_pairs: str = field(
        default="", metadata=_opt("a pairs file to evaluate on instead of holding pairs out (every pair trains)")
    )
    eval_steps: int = field(
        default=750, metadata=_opt("evaluate on the held-out pairs every N steps and at the last; the weights of "
                                   "lowest held-out loss are kept (checkpoints are written at each evaluation, or "
                                   "every --save-steps, a multiple of N, among which the best is kept)")
    )

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.head_dropout < 1.0:
            raise TrainingConfigError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.center_rewards_coefficient < 0:  # a negative one rewards ever larger scores
            raise TrainingConfigError(
                f"center_rewards_coefficient must be >= 0 (0: off), got {self.center_rewards_coefficient}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise TrainingConfigError(f"eval_fraction must be in [0, 1) (0: train on all), got {self.eval_fraction}")
        if self.eval_steps < 1:
            raise TrainingConfigError(f"eval_steps must be >= 1, got {self.eval_steps}")
        if self.eval_pairs and not Path(self.eval_pairs).is_file():
            raise TrainingConfigError(f"eval_pairs: {self.eval_pairs}: no such file")
        if self.evaluates() and self.save_steps % self.eval_steps:
            raise TrainingConfigError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}): the weights "
                "kept are chosen among the evaluated checkpoints (or pass --eval-fraction 0)")

    def evaluates(self) -> bool:
        """Whether the run evaluates on held-out pairs (and keeps its best weights)."""
        return bool(self.eval_pairs) or self.eval_fraction > 0

    def checkpoint_steps(self) -> int:
        # an evaluated run checkpoints at every evaluation, to go back to its best one at the end
        return (self.save_steps or self.eval_steps) if self.evaluates() else self.save_steps


def pair_weight(pair: PreferencePair) -> float:
    """The reference's weight of a pair (`preprocess_value_dataset`'s factor): 1 / (P * N) for a
    node with P positives and N negatives, 1 / (P + N) when one is 0; 1 without counts."""
    pos, neg = pair.pos_count, pair.neg_count
    if pos is None or neg is None or pos + neg == 0:
        return 1.0
    return 1.0 / (pos + neg) if pos == 0 or neg == 0 else 1.0 / (pos * neg)


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, max_length: int):
    """Token ids of prompt+pos and prompt+neg and the weight of each pair; pairs over
    max_length are dropped.

    Returns (dataset with chosen_ids/rejected_ids/factor/length columns, number dropped); a
    pair's length is its longer side's, what it pads its batch to (`group_by_length` reads it).
    """
    from datasets import Dataset

    chosen = tokenizer([p.prompt + p.pos for p in pairs])["input_ids"]
    rejected = tokenizer([p.prompt + p.neg for p in pairs])["input_ids"]
    keep = [i for i in range(len(pairs)) if len(chosen[i]) <= max_length and len(rejected[i]) <= max_length]
    data = Dataset.from_dict({
        "chosen_ids": [chosen[i] for i in keep],
        "rejected_ids": [rejected[i] for i in keep],
        "factor": [pair_weight(pairs[i]) for i in keep],
        "length": [max(len(chosen[i]), len(rejected[i])) for i in keep],
    })
    return data, len(pairs) - len(keep)


def hold_out(pairs: list[PreferencePair], fraction: float, seed: int,
             data_name: str = "pairs") -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs): `fraction` of them held out as the reference's RM script
    holds them out (the pairs shuffled with the seed, then `train_test_split`, so at least one)."""
    from datasets import Dataset

    held = math.ceil(fraction * len(pairs))
    if len(pairs) - held < 1:
        raise TrainingDataError(f"{data_name}: {len(pairs)} pair(s) are too few to hold {fraction:g} of them out "
                                "and train on the rest; pass --eval-fraction 0 (eval_fraction=0) to train on all")
    order = Dataset.from_dict({"i": list(range(len(pairs)))}).shuffle(seed=seed)
    split = order.train_test_split(test_size=held, seed=seed)
    return [pairs[i] for i in split["train"]["i"]], [pairs[i] for i in split["test"]["i"]]


def split_for_eval(pairs: list[PreferencePair], hp: PPMHParams,
                   data_name: str = "pairs") -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(pairs to train on, pairs to evaluate on): hp.eval_pairs' own pairs with every pair
    training, or hp.eval_fraction of `pairs` held out."""
    if hp.eval_pairs:
        return pairs, load_preference_pairs(hp.eval_pairs)
    return hold_out(pairs, hp.eval_fraction, hp.seed, data_name)


def eval_config(hp: PPMHParams) -> dict[str, Any]:
    """RewardConfig fields of a run that evaluates: every eval_steps, keeping the weights of lowest
    held-out loss (the reference's --eval_steps 750 --load_best_model_at_end)."""
    if not hp.evaluates():
        return {}
    per_device, _, _ = batch_layout(hp)
    return dict(eval_strategy="steps", eval_steps=hp.eval_steps, per_device_eval_batch_size=per_device,
                load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)


def load_ppm_model(source: Path | str, hp: TrainHParams):
    """A one-label sequence classifier from a causal LM (a new score head, started as the
    reference starts its value head), from a PPM folder, or from the reference's released
    layout (causal LM + value_head.*, whose weights become the score head's)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        try:
            model, loaded = AutoModelForSequenceClassification.from_pretrained(
                str(source), num_labels=1, dtype=torch_dtype(hp), output_loading_info=True
            )
        except model_file_errors() as e:
            raise TrainingConfigError(f"{source}: cannot load as a sequence classifier: {e}") from None
    if any(key.split(".")[0] == "score" for key in loaded["missing_keys"]):  # the checkpoint had no head
        with torch.no_grad(), whole(model.score.weight):
            torch.nn.init.normal_(model.score.weight, mean=5e-7, std=1e-6)
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
    with torch.no_grad(), whole(model.score.weight):
        model.score.weight.copy_(head.weight.to(model.score.weight.dtype))
    bias = float(head.bias.detach()[0])
    if bias and model.score.bias is None:
        # the pairwise loss does not see a constant: training is unaffected, scores shift by it
        log.warning("%s: the value head's bias (%.4g) is not kept: the sequence classifier's score head has "
                    "none, so the trained PPM's raw scores are shifted by it", folder, bias)


def loss_scale(hp: TrainHParams) -> float:
    """How much each process's summed loss is scaled: the configured per-device batch over the
    one this many devices get (batch_layout gives fewer pairs each past batch_size / per-device),
    and over the GPUs whose batches one process sums (DataParallel), so that a step's gradient
    is the mean of the devices' sums, as DDP makes it."""
    per_device, _, _ = batch_layout(hp)
    return hp.per_device_batch_size / (per_device * gpus_per_process(hp))


def _weighted_reward_trainer(loss_scale: float = 1.0, **kwargs: Any):
    """TRL's RewardTrainer whose loss is the reference's: each pair's `-log sigmoid(margin)`
    times its weight (the dataset's `factor` column), summed over the batch. A sum grows with
    the per-device batch: `loss_scale` keeps the configured one's scale where many processes
    took a smaller one (batch_layout)."""
    import torch
    import torch.nn.functional as F
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class WeightedCollator(DataCollatorForPreference):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = super().torch_call(examples)
            batch["factor"] = torch.tensor([e["factor"] for e in examples], dtype=torch.float)
            return batch

    class WeightedRewardTrainer(RewardTrainer):
        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            # kept for the collator (factor) and the length-grouped sampler (length)
            # set by the call above (transformers declares it Optional)
            self._signature_columns += [c for c in ("factor", "length")  # type: ignore[operator]
                                        if c not in self._signature_columns]  # type: ignore[operator]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            factor = inputs.pop("factor")
            # the parent runs the model and logs accuracy and margins; its mean loss is replaced
            _, outputs = super().compute_loss(model, inputs, return_outputs=True)
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1).float(), chunks=2)
            loss = (-F.logsigmoid(chosen - rejected) * factor.to(chosen.device)).sum() * loss_scale
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
            return (loss, outputs) if return_outputs else loss

    pad_token_id = kwargs["processing_class"].pad_token_id
    return WeightedRewardTrainer(data_collator=WeightedCollator(pad_token_id=pad_token_id), **kwargs)


def _head_dropout(model, p: float) -> None:
    """Dropout on the score head's input while training, as the reference's value head has
    (a hook, so the saved checkpoint is an ordinary sequence classifier)."""
    import torch.nn.functional as F

    if p > 0:
        model.score.register_forward_pre_hook(lambda head, args: (F.dropout(args[0], p, head.training),))


def build_ppm_trainer(
    pairs: list[PreferencePair],
    init_source: Path | str,
    out_dir: str | Path,
    hp: PPMHParams,
    *,
    data_name: str = "pairs",
    held_out: list[PreferencePair] | None = None,
):
    """The reward trainer for a run, ready to `.train()`; returns (trainer, loss logger, pairs dropped).

    A run that evaluates (hp.evaluates()) does so on `held_out`, or else on `split_for_eval`'s."""
    from transformers import set_seed
    from trl import RewardConfig

    out_dir = Path(out_dir)
    set_seed(hp.seed)  # the new score head's initialisation
    # before the model: under DeepSpeed ZeRO-3 the config makes each process load only its shard
    config = RewardConfig(
        **trainer_kwargs(hp, out_dir),
        **eval_config(hp),
        max_length=None,  # filtered below, where the count is kept
        center_rewards_coefficient=hp.center_rewards_coefficient or None,
        disable_dropout=True,
    )
    check_devices(config, hp)
    tokenizer = load_tokenizer(init_source)
    model = load_ppm_model(init_source, hp)
    if hp.add_step_tokens:
        add_step_tokens(tokenizer, model, REFERENCE_PPM_TOKENS)
    set_pad_token(model, tokenizer)
    _head_dropout(model, hp.head_dropout)
    if hp.evaluates() and held_out is None:
        pairs, held_out = split_for_eval(pairs, hp, data_name)
    dataset, dropped = tokenize_pairs(pairs, tokenizer, hp.max_length)
    if len(dataset) == 0:
        kept = f" it trains on ({len(held_out)} held out)" if held_out is not None and not hp.eval_pairs else ""
        raise TrainingDataError(
            f"{data_name}: all {len(pairs)} pairs{kept} are longer than max_length={hp.max_length} tokens"
        )
    eval_dataset = None
    if held_out is not None:
        eval_dataset, eval_dropped = tokenize_pairs(held_out, tokenizer, hp.max_length)
        if len(eval_dataset) == 0:
            raise TrainingDataError(f"{hp.eval_pairs or data_name + ' (held out)'}: all {len(held_out)} pairs are longer than "
                                    f"max_length={hp.max_length} tokens (or none there)")
        dropped += eval_dropped
    logger = make_loss_logger(out_dir / LOSS_LOG_FILE)
    trainer = _weighted_reward_trainer(
        loss_scale=loss_scale(hp), model=model, args=config, train_dataset=dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, callbacks=[logger],
    )
    return trainer, logger, dropped


def train_ppm(
    pairs_path: str | Path,
    init_path: str | Path | None,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    **hparams: Any,
) -> TrainResult:
    """Train a PPM on `{prompt, pos, neg, ...}` pairs, starting from `init_path`'s weights.

    `init_path` is the policy (a causal LM folder), an existing PPM folder, or None / "tiny" for
    a fresh tiny model. `hparams` are PPMHParams fields. Writes the checkpoint (an ordinary HF
    folder the engines load as `hf:OUT`), OUT/loss_log.jsonl and OUT/train_result.json.
    An OUT that holds a finished run (train_result.json) is refused unless `overwrite`.
    """
    require_training_stack()
    hp = PPMHParams.from_kwargs(**hparams)
    from rstar_fast.engines.hf import quiet_deepspeed_on_cpu

    quiet_deepspeed_on_cpu()
    check_out(out_dir, init_path, overwrite=overwrite)
    pairs = load_preference_pairs(pairs_path)  # bad data fails before any model is loaded
    held_out = None
    if hp.evaluates():
        pairs, held_out = split_for_eval(pairs, hp, str(pairs_path))
    with progress_bars(hp.progress), resolve_init(init_path, hp) as (source, init_name):
        trainer, logger, dropped = build_ppm_trainer(pairs, source, out_dir, hp, data_name=str(pairs_path),
                                                   held_out=held_out)
        return run_trainer(
            trainer, logger, kind="ppm", out_dir=Path(out_dir), init=init_name, data_path=Path(pairs_path),
            examples=len(trainer.train_dataset), skipped=dropped, hp=hp, overwrite=overwrite,
        )
