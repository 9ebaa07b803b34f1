"""Policy SFT: causal-LM loss on the response only, from `{query, response}` records.

Each record becomes a prompt-completion example for TRL's SFTTrainer: the prompt is the
rounds-2+ question prompt (the template), the completion the response plus EOS; the prompt's
tokens get label -100, so only the response is learned. This is the reference's train_SFT.py
recipe (its PROMPT_DICT template, the source masked, EOS after the target).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rstar_fast.search.prompts import SFT_SUFFIX
from rstar_fast.training.common import (
    LOSS_LOG_FILE,
    REFERENCE_SFT_TOKENS,
    TrainHParams,
    TrainResult,
    _opt,
    add_step_tokens,
    check_devices,
    check_out,
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
)
from rstar_fast.training.data import SFTExample, TrainingConfigError, TrainingDataError, load_sft_examples

log = logging.getLogger(__name__)

# The rounds 2-4 and evaluation prompt (the reference's SFT PROMPT_DICT).
SFT_TEMPLATE = SFT_SUFFIX.replace("{input}", "{query}")


@dataclass
class SFTHParams(TrainHParams):
    """SFT defaults from the reference's SFT script: lr 7e-6, 2 epochs, weight decay 0.1, linear
    schedule, no warmup, per-device batch 4 with 4 accumulation steps on 8 GPUs (global 128)."""

    batch_size: int = field(
        default=128, metadata=_opt("global batch of examples (per-device x devices x accumulation)")
    )
    per_device_batch_size: int = field(default=4, metadata=_opt("examples per device and step"))
    weight_decay: float = field(default=0.1, metadata=_opt("AdamW weight decay"))
    template: str = field(
        default=SFT_TEMPLATE, metadata=_opt("prompt template; {query} is replaced by the question")
    )

    def validate(self) -> None:
        super().validate()
        if "{query}" not in self.template:
            raise TrainingConfigError(f"the SFT template must contain {{query}}, got {self.template!r}")


def format_prompt(template: str, query: str) -> str:
    # str.replace, not str.format: questions are full of braces ($\frac{1}{2}$).
    return template.replace("{query}", query)


def sft_dataset(examples: list[SFTExample], template: str):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [format_prompt(template, e.query) for e in examples],
            "completion": [e.response for e in examples],
        }
    )


def load_policy_model(source: Path | str, hp: TrainHParams):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        architectures = AutoConfig.from_pretrained(str(source)).architectures or []
    except (OSError, ValueError) as e:
        raise TrainingConfigError(f"{source}: cannot load as a causal LM: {e}") from None
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        # loading it as a causal LM would start from a random LM head, without a word
        raise TrainingConfigError(f"{source}: is a sequence classifier ({architectures[0]}), a PPM; policy SFT "
                                  "starts from a causal LM (the base model or a policy)")
    with quiet_transformers():
        try:
            return AutoModelForCausalLM.from_pretrained(str(source), dtype=torch_dtype(hp))
        except model_file_errors() as e:
            raise TrainingConfigError(f"{source}: cannot load as a causal LM: {e}") from None


def build_sft_trainer(
    examples: list[SFTExample], init_source: Path | str, out_dir: str | Path, hp: SFTHParams
):
    """The SFTTrainer for a run, ready to `.train()`; returns (trainer, loss logger).

    `trainer.train_dataset` holds the tokenized examples (input_ids, labels with the prompt
    at -100) and `trainer.data_collator` batches them.
    """
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    out_dir = Path(out_dir)
    set_seed(hp.seed)
    # before the model: under DeepSpeed ZeRO-3 the config makes each process load only its shard
    config = SFTConfig(
        **trainer_kwargs(hp, out_dir),
        max_length=hp.max_length,  # longer examples are truncated, as the reference does
        completion_only_loss=True,
        packing=False,
    )
    check_devices(config, hp)
    tokenizer = load_tokenizer(init_source)
    model = load_policy_model(init_source, hp)
    if hp.add_step_tokens:
        add_step_tokens(tokenizer, model, REFERENCE_SFT_TOKENS)
    set_pad_token(model, tokenizer)
    logger = make_loss_logger(out_dir / LOSS_LOG_FILE)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=sft_dataset(examples, hp.template),
        processing_class=tokenizer,
        callbacks=[logger],
    )
    return trainer, logger


def train_sft(
    data_path: str | Path,
    init_path: str | Path | None,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    **hparams: Any,
) -> TrainResult:
    """Fine-tune a policy on `{query, response}` records, loss on the response only.

    `init_path` is a causal LM folder, or None / "tiny" to train a fresh tiny model (byte
    tokenizer; size from tiny_hidden_size, tiny_layers, tiny_heads) from scratch. `hparams` are
    SFTHParams fields. Writes the checkpoint (an ordinary HF folder, `hf:OUT` for the
    engines), OUT/loss_log.jsonl and OUT/train_result.json.
    An OUT that holds a finished run (train_result.json) is refused unless `overwrite`.
    """
    require_training_stack()
    hp = SFTHParams.from_kwargs(**hparams)
    from rstar_fast.engines.hf import quiet_deepspeed_on_cpu

    quiet_deepspeed_on_cpu()
    check_out(out_dir, init_path, overwrite=overwrite)
    examples = load_sft_examples(data_path)  # bad data fails before any model is loaded
    made = not Path(out_dir).exists()
    with progress_bars(hp.progress), resolve_init(init_path, hp) as (source, init_name):
        trainer, logger = build_sft_trainer(examples, source, out_dir, hp)  # the Trainer makes out_dir
        kept = len(trainer.train_dataset)  # TRL drops examples whose response is cut off entirely
        if kept == 0:
            if made:  # a refusal leaves nothing behind
                with contextlib.suppress(OSError):
                    Path(out_dir).rmdir()
            raise TrainingDataError(
                f"{data_path}: all {len(examples)} prompts are longer than max_length={hp.max_length} tokens"
            )
        # TRL cuts the rest at max_length, keeping the start: the end of a long solution, its EOS
        # among it, is then never trained on (the reference cuts alike); said, and counted
        cut = sum(len(ids) >= hp.max_length for ids in trainer.train_dataset["input_ids"])
        if cut:
            log.warning("%s: %d of the %d examples reach max_length=%d tokens and are cut there (their end, "
                        "EOS included, is not trained on); --max-length keeps them whole", data_path, cut, kept,
                        hp.max_length)
        return run_trainer(
            trainer, logger, kind="sft", out_dir=Path(out_dir), init=init_name, data_path=Path(data_path),
            examples=kept, skipped=len(examples) - kept, hp=hp, cut=cut, overwrite=overwrite,
        )
