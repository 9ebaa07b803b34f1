"""What PPM and policy training share: hyperparameters, the model to start from, the Trainer
settings for the device at hand, the loss log and the result record.

torch, transformers and TRL are imported inside functions, so `import rstar_fast.training`
stays cheap for callers that only read results.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rstar_fast.training.data import TrainingConfigError, TrainingError

log = logging.getLogger(__name__)

RESULT_FILE = "train_result.json"
LOSS_LOG_FILE = "loss_log.jsonl"
SETTINGS_FILE = "train_settings.json"  # beside a run's checkpoints: what they are trained with
LOCK_FILE = ".train.lock"  # held by the run writing into the folder
TINY_INIT = "tiny"  # init spec meaning "a fresh random tiny model on the byte tokenizer"


def _opt(help: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {"help": help, "choices": choices}


def _coerce(name: str, value: Any, kind: type) -> Any:
    """`value` as the field's type (bool, int, float or str), or a TrainingConfigError naming both."""
    if kind is bool or kind is str:
        if isinstance(value, kind):
            return value
        raise TrainingConfigError(f"{name} must be {'true or false' if kind is bool else 'a string'}, got {value!r}")
    number = value
    if isinstance(value, str):  # YAML reads 1e-5 (no dot) as text
        try:
            number = float(value)
        except ValueError:
            number = None
    # bool is an int subclass, but True as a batch size is a mistake
    ok = isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number)
    if ok and kind is float:
        return float(number)
    if ok and float(number).is_integer():
        return int(number)
    raise TrainingConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")


@dataclass
class TrainHParams:
    """Hyperparameters both trainings take; every field is a CLI flag (`--learning-rate` ...).

    Defaults are the reference's (microsoft/rStar, rStar-math branch, README "SFT Train Script"
    and "RM Train Script"): lr 7e-6, 2 epochs, linear schedule, no warmup, max length 2048,
    AdamW (torch). Batch sizes are global: per-device batch x devices x accumulation steps;
    the accumulation is derived from the number of processes (WORLD_SIZE under torchrun or
    accelerate), so the same command keeps the same global batch on 1 or 64 GPUs.
    """

    learning_rate: float = field(default=7e-6, metadata=_opt("peak learning rate"))
    epochs: float = field(default=2.0, metadata=_opt("passes over the data"))
    batch_size: int = field(default=128, metadata=_opt("global batch (per-device x devices x accumulation)"))
    per_device_batch_size: int = field(default=4, metadata=_opt("micro-batch per device and step"))
    max_length: int = field(default=2048, metadata=_opt("longest sequence in tokens"))
    weight_decay: float = field(default=0.0, metadata=_opt("AdamW weight decay"))
    warmup_ratio: float = field(default=0.0, metadata=_opt("fraction of steps of linear warmup"))
    lr_scheduler: str = field(
        default="linear",
        metadata=_opt("learning-rate schedule", ("linear", "cosine", "constant", "constant_with_warmup")),
    )
    max_steps: int = field(default=-1, metadata=_opt("stop after N optimizer steps (-1: all epochs)"))
    seed: int = field(default=42, metadata=_opt("random seed (data order, new heads, tiny init)"))
    precision: str = field(
        default="auto",
        metadata=_opt("auto: bf16 mixed on CUDA (fp16 before Ampere), fp32 on CPU", ("auto", "bf16", "fp16", "fp32")),
    )
    model_dtype: str = field(
        default="float32",
        metadata=_opt("dtype the weights are loaded and kept in (bfloat16 without DeepSpeed's fp32 master "
                      "weights: updates as small as lr 7e-6 round away)", ("float32", "bfloat16")),
    )
    gradient_checkpointing: str = field(
        default="auto",
        metadata=_opt("recompute activations to save memory; auto: on with CUDA", ("auto", "on", "off")),
    )
    optim: str = field(default="adamw_torch", metadata=_opt("transformers optimizer name"))
    group_by_length: bool = field(
        default=False,
        metadata=_opt("batch examples of similar length together (less padding, so less compute): the "
                      "shuffled data is sorted by length in groups of up to 50 batches"),
    )
    max_grad_norm: float = field(default=1.0, metadata=_opt("gradient clipping norm (0: no clipping)"))
    logging_steps: int = field(default=1, metadata=_opt("log the loss every N optimizer steps"))
    save_steps: int = field(default=0, metadata=_opt("also checkpoint every N steps (0: final only)"))
    save_total_limit: int = field(
        default=2, metadata=_opt("checkpoints kept, the newest (0: all); a resume needs one whole, and one "
                                 "cut short by a kill falls back to the one before")
    )
    fsdp: str = field(default="", metadata=_opt("transformers --fsdp value, e.g. 'full_shard auto_wrap'"))
    fsdp_layer_cls: str = field(default="", metadata=_opt("layer class FSDP wraps, e.g. Qwen2DecoderLayer"))
    deepspeed: str = field(default="", metadata=_opt("path of a DeepSpeed JSON config"))
    add_step_tokens: bool = field(
        default=True, metadata=_opt("add step-format special tokens the tokenizer lacks")
    )
    progress: bool = field(default=True, metadata=_opt("show progress bars"))
    tiny_hidden_size: int = field(default=64, metadata=_opt("hidden size of a fresh tiny model (--init tiny)"))
    tiny_layers: int = field(default=2, metadata=_opt("layers of a from-scratch tiny model"))
    tiny_heads: int = field(default=4, metadata=_opt("attention heads of a from-scratch tiny model"))

    @classmethod
    def from_kwargs(cls, **kwargs: Any):
        """Build and validate from option values; numbers given as text ("1e-5", from a
        YAML `KEY=VALUE` or a config file) are converted, any other type is refused by name."""
        kinds = typing.get_type_hints(cls)
        unknown = sorted(set(kwargs) - set(kinds))
        if unknown:
            raise TrainingConfigError(
                f"unknown {cls.__name__} option(s): {', '.join(unknown)}; known: {', '.join(sorted(kinds))}"
            )
        hp = cls(**{name: _coerce(name, value, kinds[name]) for name, value in kwargs.items()})
        hp.validate()
        return hp

    def validate(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                value = getattr(self, f.name)
                raise TrainingConfigError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        positive = ("learning_rate", "epochs", "batch_size", "per_device_batch_size", "max_length")
        for name in (*positive, "logging_steps"):
            if not getattr(self, name) > 0:
                raise TrainingConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise TrainingConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise TrainingConfigError(f"max_steps must be -1 (all epochs) or > 0, got {self.max_steps}")
        for name, zero in (("max_grad_norm", "no clipping"), ("save_steps", "final only"),
                           ("save_total_limit", "all kept"), ("weight_decay", "none")):
            if getattr(self, name) < 0:
                raise TrainingConfigError(f"{name} must be >= 0 (0: {zero}), got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise TrainingConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        for name in ("tiny_hidden_size", "tiny_layers", "tiny_heads"):
            if getattr(self, name) < 1:
                raise TrainingConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.model_dtype == "bfloat16" and not self.deepspeed:
            log.warning("model_dtype bfloat16 without DeepSpeed: the optimizer updates the bfloat16 weights "
                        "themselves, and updates smaller than about 1/256 of a weight (at lr %g, most) round "
                        "away; DeepSpeed keeps float32 master weights", self.learning_rate)
        if self.deepspeed:
            if not Path(self.deepspeed).is_file():
                raise TrainingConfigError(f"deepspeed: {self.deepspeed}: no such config file")
            if importlib.util.find_spec("deepspeed") is None:
                raise TrainingConfigError(
                    "deepspeed: the deepspeed package is not installed (pip install 'rstar-fast[deepspeed]')")
        if self.tiny_hidden_size % self.tiny_heads:
            raise TrainingConfigError(
                f"tiny_hidden_size ({self.tiny_hidden_size}) must be a multiple of tiny_heads ({self.tiny_heads})"
            )
        if self.optim != TrainHParams.optim:  # the default needs no transformers import (seconds)
            check_optim(self.optim)

    def checkpoint_steps(self) -> int:
        """Steps between checkpoints, 0 for none: the run saves only its final model."""
        return self.save_steps


TRAINING_MODULES = ("torch", "transformers", "tokenizers", "trl", "datasets")  # the `train` extra's


def require_training_stack() -> None:
    """A ModuleNotFoundError naming what training lacks and the extra to install, before any work."""
    missing = [m for m in TRAINING_MODULES if sys.modules.get(m, False) is None or importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"training needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            "pip install 'rstar-fast[train]'", name=missing[0])


def check_optim(name: str) -> None:
    """Refuse an optimizer transformers does not know, which it would only do once the model is built."""
    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames]
    if name not in names:
        common = [n for n in ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_8bit") if n in names]
        raise TrainingConfigError(f"optim must be a transformers optimizer name, e.g. {', '.join(common)} "
                                  f"({len(names)} in all, see transformers' OptimizerNames), got {name!r}")


@dataclass
class TrainResult:
    """What a training run did; also written as OUT/train_result.json."""

    kind: str  # "ppm" or "sft"
    out_dir: str  # the checkpoint: an ordinary Hugging Face folder (model + tokenizer)
    init: str  # what the weights started from (a path, or "tiny")
    data_path: str
    examples: int  # records trained on
    skipped: int  # records dropped (longer than max_length)
    steps: int  # optimizer steps taken
    epochs: float
    effective_batch_size: int
    first_loss: float | None
    final_loss: float | None  # the last logged training loss
    mean_loss: float | None  # mean training loss over the run's steps (its logged windows, weighted by steps)
    seconds: float
    loss_log: str  # OUT/loss_log.jsonl: one {"step", "loss", ...} object per logged step
    metrics: dict[str, float] = field(default_factory=dict)  # last logged extras (PPM accuracy, margin)
    hparams: dict[str, Any] = field(default_factory=dict)
    cut: int = 0  # records trained on that reach max_length, their end (EOS included) cut off
    eval_examples: int = 0  # held-out records evaluated on (a PPM's 5% of its pairs by default)
    # the saved model on them: eval_loss, eval_accuracy (pairs ranked right), eval_margin
    eval_metrics: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None  # the step whose weights were kept, lowest held-out loss; None: the last

    def save(self) -> Path:
        from rstar_fast.files import write_json

        path = Path(self.out_dir) / RESULT_FILE
        write_json(path, asdict(self))
        return path


def load_train_result(out_dir: str | Path) -> TrainResult | None:
    """The result of a finished run in `out_dir`, or None when none finished there (resume checks)."""
    path = Path(out_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return TrainResult(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise TrainingError(f"{path}: not a training result this version reads ({e}); delete it to train "
                            "that model again") from None


# where launchers put a process's rank and their number: torchrun and accelerate launch, then
# the MPI launchers (mpirun of Open MPI, MVAPICH, MPICH), as accelerate reads them
_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")
_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")


def _launcher_int(names: Sequence[str], default: int) -> int:
    return next((int(os.environ[n]) for n in names if os.environ.get(n, "").strip().isdigit()), default)


def world_rank() -> int:
    """This process's rank in a distributed run (torchrun, accelerate launch, mpirun); 0 alone."""
    return _launcher_int(_RANK_VARS, 0)


def world_size() -> int:
    return max(1, _launcher_int(_SIZE_VARS, 1))


def gpus_per_process(hp: TrainHParams) -> int:
    """GPUs one process trains on: all those visible for a process no launcher started, on a
    machine with several (transformers' Trainer then runs the model under DataParallel, each
    GPU taking a per-device batch), else one (a launcher's process, even the only one, runs DDP)."""
    launched = _launcher_int(("LOCAL_RANK",), -1) >= 0
    if world_size() > 1 or launched or hp.deepspeed or not _cuda():
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def devices(hp: TrainHParams) -> int:
    """Devices an optimizer step's batch is spread over: processes times their GPUs."""
    return world_size() * gpus_per_process(hp)


def batch_layout(hp: TrainHParams) -> tuple[int, int, int]:
    """(per-device batch, accumulation steps, effective global batch) for this many devices."""
    spread = devices(hp)
    per_device = max(1, min(hp.per_device_batch_size, hp.batch_size // spread))
    accumulation = max(1, hp.batch_size // (per_device * spread))
    return per_device, accumulation, per_device * accumulation * spread


def check_devices(config: Any, hp: TrainHParams) -> None:
    """Refuse a run whose Trainer spreads each batch over other devices than batch_layout laid
    it out for: every step would train on a batch of another size than the one configured."""
    trainer_gpus, expected = max(1, config.n_gpu), gpus_per_process(hp)
    if trainer_gpus != expected:
        raise TrainingConfigError(
            f"the trainer drives {trainer_gpus} device(s) in this process where {expected} were expected; "
            "launch one process per GPU (torchrun --nproc_per_node N) or set CUDA_VISIBLE_DEVICES")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def precision_flags(hp: TrainHParams) -> dict[str, bool]:
    """bf16/fp16 Trainer flags: mixed precision on CUDA, plain fp32 on CPU unless asked."""
    precision = hp.precision
    if precision == "auto":
        if _cuda():
            import torch

            # emulated bf16 (GPUs before Ampere) is slow: those train in fp16
            precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        else:
            precision = "fp32"
    if precision == "fp16" and not _cuda():
        raise TrainingConfigError("precision fp16 needs a CUDA device; use fp32 (or bf16) on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _argument_names() -> set[str]:
    import dataclasses

    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def trainer_kwargs(hp: TrainHParams, out_dir: Path) -> dict[str, Any]:
    """TrainingArguments fields common to RewardConfig and SFTConfig."""
    from rstar_fast.engines.hf import accelerator_available

    per_device, accumulation, effective = batch_layout(hp)
    if effective != hp.batch_size:
        log.warning("global batch %d instead of batch_size %d: it must be a multiple of the per-device batch "
                    "(%d) times the devices (%d)", effective, hp.batch_size, per_device, devices(hp))
    checkpointing = hp.gradient_checkpointing == "on" or (hp.gradient_checkpointing == "auto" and _cuda())
    kwargs: dict[str, Any] = dict(
        output_dir=str(out_dir),
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        weight_decay=hp.weight_decay,
        lr_scheduler_type=hp.lr_scheduler,
        optim=hp.optim,
        max_grad_norm=hp.max_grad_norm,
        seed=hp.seed,
        dataloader_pin_memory=_cuda(),
        logging_strategy="steps",
        logging_steps=hp.logging_steps,
        save_strategy="steps" if hp.checkpoint_steps() > 0 else "no",
        save_steps=hp.checkpoint_steps() or 500,
        save_total_limit=hp.save_total_limit or None,
        report_to="none",
        disable_tqdm=not hp.progress,
        dataloader_num_workers=0,
        # on a machine without an accelerator accelerate sets up processes launched together
        # (torchrun on the CPU) only when told: else each one trains alone, as a world of one
        use_cpu=not accelerator_available() and not hp.deepspeed,
        **precision_flags(hp),
    )
    # transformers 5 renamed gradient_checkpointing (TRL still defaults the old name to True),
    # turned group_by_length into a sampling strategy and took a warmup fraction as warmup_steps
    # < 1 (4.x has warmup_ratio, and warmup_steps must be a whole number)
    names = _argument_names()
    if "warmup_ratio" in names:
        kwargs.update(warmup_ratio=hp.warmup_ratio, warmup_steps=0)
    else:
        kwargs["warmup_steps"] = hp.warmup_ratio
    kwargs["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = checkpointing
    if hp.group_by_length:
        kwargs.update({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in names
                      else {"group_by_length": True})
    if hp.fsdp:
        kwargs["fsdp"] = hp.fsdp
        if hp.fsdp_layer_cls:
            kwargs["fsdp_config"] = {"transformer_layer_cls_to_wrap": [hp.fsdp_layer_cls]}
    if hp.deepspeed:
        kwargs["deepspeed"] = hp.deepspeed
    return kwargs


@contextlib.contextmanager
def resolve_init(init_path: str | Path | None, hp: TrainHParams) -> Iterator[tuple[Path | str, str]]:
    """Yield (where to load the initial weights from, how to describe them).

    None or "tiny" builds a fresh random tiny causal LM with the byte tokenizer in a temporary
    folder (a model from scratch, for tests and trials); anything else must be a model folder or,
    when it names no local path, a Hub id (resolved by transformers, which then may download).
    """
    if init_path is None or str(init_path) == TINY_INIT:
        from rstar_fast.engines.tiny import build_tiny_policy

        with tempfile.TemporaryDirectory(prefix="rstar_tiny_init_") as tmp:
            build_tiny_policy(
                tmp, seed=hp.seed, hidden_size=hp.tiny_hidden_size, layers=hp.tiny_layers, heads=hp.tiny_heads
            )
            yield Path(tmp), TINY_INIT
        return
    check_init(init_path)
    path = Path(init_path)
    yield (path if path.is_dir() else str(init_path)), str(init_path)


def check_out(out_dir: str | Path, init_path: str | Path | None, *, overwrite: bool = False) -> None:
    """Refuse an output folder training could not write, or should not: the initial model's own
    folder, or a finished checkpoint (train_result.json) unless `overwrite`. A folder without
    train_result.json is an unfinished run (evolve resumes into those): it is trained into."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TrainingConfigError(f"--out {out}: exists and is not a folder")
    if init_path is not None and Path(init_path).is_dir() and Path(init_path).resolve() == out.resolve():
        raise TrainingConfigError(f"--out {out}: is the --init model folder; training would overwrite the "
                                  "initial checkpoint, choose another output folder")
    if (out / RESULT_FILE).is_file() and not overwrite:
        raise TrainingConfigError(f"--out {out}: holds a finished checkpoint ({RESULT_FILE}); pass --overwrite "
                                  "(overwrite=True) to train it again, or choose another output folder")
    missing = []  # the folders mkdir(parents=True) would make, deepest first
    existing = out
    while not existing.exists():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise TrainingConfigError(f"--out {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingConfigError(f"--out {out}: {existing} is not writable")
    # access() says yes to root where mkdir fails (/proc): make the missing folders now, not
    # after the model has loaded, and remove them again (a refusal later leaves nothing behind).
    # One process of a distributed run does it: made and removed by several at once, each
    # would find the others' folders come and go.
    if world_rank() != 0:
        return
    made: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            made.append(folder)
    except OSError as e:
        raise TrainingConfigError(f"--out {out}: cannot make the folder: {e.strerror or e}") from None
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()


def check_init(init_path: str | Path | None) -> None:
    """Refuse an init that is neither "tiny" (or None), a model folder, nor a Hub id, before
    anything is trained. A name like `runs/x` whose first folder exists here is a local path
    with a typo, not a Hub id."""
    if init_path is None or str(init_path) == TINY_INIT:
        return
    path = Path(init_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TrainingConfigError(f"{path}: not a model folder (no config.json)")
        from transformers import AutoConfig

        try:  # a config transformers cannot read fails here, not after hours of search
            AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise TrainingConfigError(f"{path}: cannot read its config.json: {e}") from None
        return
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", str(init_path)) and not str(init_path).startswith(".")
    if not hub_id:
        raise TrainingConfigError(f"{path}: no such model folder (and not a Hub id like 'org/name')")
    if path.parent.is_dir():
        raise TrainingConfigError(f"{path}: no such model folder (the folder {path.parent} exists here, "
                                  "so this is read as a local path, not a Hub id)")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence load-time notices that are expected here (a new score head, an unused lm_head)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


class _TiedKeysNotice(logging.Filter):
    """Drops the Trainer's notice, on a resume, that the checkpoint lacks weights tied to others
    (`lm_head.weight`, saved once, as the embeddings): they are loaded, through what they are
    tied to. A checkpoint missing any other weight is still said."""

    PREFIX = "There were missing keys in the checkpoint model loaded: "

    def __init__(self, tied: set[str]) -> None:
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        missing = re.findall(r"'([^']*)'", message[len(self.PREFIX):])
        return not (missing and set(missing) <= self.tied)


@contextlib.contextmanager
def tied_keys_unsaid(model: Any) -> Iterator[None]:
    """Within: the Trainer does not warn that a resumed checkpoint lacks `model`'s tied weights."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied = every - {name for name, _ in model.named_parameters()}  # the second name of a shared tensor
    notice = _TiedKeysNotice(tied)
    trainer_log = logging.getLogger("transformers.trainer")
    trainer_log.addFilter(notice)
    try:
        yield
    finally:
        trainer_log.removeFilter(notice)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Turn the datasets and transformers progress bars off for a quiet run (the Trainer's
    own bar follows `disable_tqdm`)."""
    if enabled:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    was_datasets = datasets.is_progress_bar_enabled()
    was_hf = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_datasets:
            datasets.enable_progress_bars()
        if was_hf:
            hf_logging.enable_progress_bar()


def load_tokenizer(source: Path | str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise TrainingConfigError(f"{source}: cannot load a tokenizer: {e}") from None
    if tok.pad_token is None:
        # Sequence classification reads the last non-pad token, so a pad id must exist.
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(hp: TrainHParams):
    import torch

    return torch.bfloat16 if hp.model_dtype == "bfloat16" else torch.float32


# The special tokens the reference's training scripts add, in their order (`train_SFT.py`; its
# `train_RM.py` adds the first 12): a base model trained here gets the ids a reference-trained
# one has, so policies and PPMs from either side work together (the search hands the policy's
# token ids to the PPM as they are).
REFERENCE_SFT_TOKENS: tuple[str, ...] = (
    "<code>", "<end_of_step>", "<end_of_code>", "<output>", "<end_of_output>", "<answer>", "<end_of_answer>",
    "<|user|>", "<|assistant|>", "<refine>", "<end_of_refine>", "\n<|assistant|>", "<error_info>",
    "<end_of_error_info>", "<BACK>",
)
REFERENCE_PPM_TOKENS: tuple[str, ...] = REFERENCE_SFT_TOKENS[:12]


def add_step_tokens(tokenizer, model, tokens: Sequence[str]) -> list[str]:
    """Add those of `tokens` the tokenizer lacks as special tokens, in order, and grow the
    model's embeddings to match, as the reference's training scripts do."""
    import inspect

    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        # transformers 5 renamed the flag that keeps the special tokens already there
        params = inspect.signature(tokenizer.add_special_tokens).parameters
        keep = "replace_extra_special_tokens" if "replace_extra_special_tokens" in params else (
            "replace_additional_special_tokens")
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, **{keep: False})
        # new rows drawn as the model's init draws them, as under the reference's transformers
        # (4.45: no mean resizing)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return missing


@contextlib.contextmanager
def whole(*params) -> Iterator[None]:
    """Parameters to read or edit whole. Under DeepSpeed ZeRO-3 each process holds a shard of
    each: they are gathered, and the first process's edits given to all when the block ends."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0):
        yield


def set_pad_token(model, tokenizer) -> None:
    model.config.pad_token_id = tokenizer.pad_token_id
    text_config = model.config.get_text_config()
    text_config.pad_token_id = tokenizer.pad_token_id


METRICS = ("accuracy", "margin", "mean_reward")  # the reward trainer's, kept in train_result.json
EVAL_METRICS = ("eval_loss", "eval_accuracy", "eval_margin")  # on held-out records, logged at each evaluation


def _logged(logs: dict[str, Any], keys: Sequence[str]) -> dict[str, float]:
    return {k: float(logs[k]) for k in keys
            if isinstance(logs.get(k), (int, float)) and math.isfinite(float(logs[k]))}


def make_loss_logger(path: Path):
    """A TrainerCallback that appends each logged training loss to `path` as a JSON line."""
    from transformers import TrainerCallback

    from rstar_fast.files import write_text

    class LossLogger(TrainerCallback):
        def __init__(self) -> None:
            self.path = path
            self.resuming = False
            self._fh = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            kept = []  # resumed: the rows up to the checkpoint's step stay, the later ones are redone
            if self.resuming and self.path.is_file():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    with contextlib.suppress(ValueError, TypeError, AttributeError):
                        if json.loads(line).get("step", 0) <= state.global_step:
                            kept.append(line + "\n")
            write_text(self.path, "".join(kept))  # whole or not at all: a kill now loses no row
            self._fh = open(self.path, "a", encoding="utf-8")

        def on_step_end(self, args, state, control, **kwargs):
            # a checkpoint's step and the last one end a logged window too: the log then covers
            # every step, and a resumed run's mean loss is the whole run's (mean_loss)
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "eval_loss" in logs:  # an evaluation on the held-out records
                row = {"step": state.global_step, **_logged(logs, EVAL_METRICS)}
            elif logs and "loss" in logs:
                row = {"step": state.global_step, "loss": float(logs["loss"])}
                row.update(_logged(logs, ("learning_rate", "grad_norm", "epoch", *METRICS)))
            else:
                return
            if self._fh is not None:
                self._fh.write(json.dumps(row) + "\n")
                self._fh.flush()

        def on_train_end(self, args, state, control, **kwargs):
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    return LossLogger()


def run_trainer(trainer, logger, *, kind: str, out_dir: Path, init: str, data_path: Path, examples: int,
                skipped: int, hp: TrainHParams, cut: int = 0, overwrite: bool = False) -> TrainResult:
    """Train, save the final model and tokenizer to `out_dir`, write train_result.json. With
    --save-steps, a run killed part way goes on from its last checkpoint when run again under
    the same settings (others are refused; `overwrite` starts afresh)."""
    from rstar_fast.files import hold_lock, naming_errors

    if not hp.progress:
        from transformers import PrinterCallback

        # without its bar the Trainer prints every log dict instead; the loss log keeps them
        trainer.remove_callback(PrinterCallback)
    main = trainer.is_world_process_zero()
    if main:  # (the Trainer has made it where it saves; not every version need)
        out_dir.mkdir(parents=True, exist_ok=True)
    # a second launch into this folder would resume the first one's checkpoints and save over it
    lock = hold_lock(out_dir / LOCK_FILE) if main else None
    if main and lock is None:
        raise TrainingConfigError(f"--out {out_dir}: another training is writing into it; wait for it to end, "
                                  "or choose another output folder")
    try:
        if main:
            # an --overwrite retrain: unmarked before anything is written, so an interrupted one
            # leaves an unfinished folder, never a finished-looking one with mixed files
            (out_dir / RESULT_FILE).unlink(missing_ok=True)
            if overwrite:  # afresh: not from an earlier run's checkpoints
                _remove_checkpoints(out_dir)
        trainer.accelerator.wait_for_everyone()  # each process looks for checkpoints once they are settled
        resume = _resume_point(out_dir, lambda: _run_settings(kind, init, data_path, hp), hp, main)
        logger.resuming = resume is not None
        start = time.monotonic()
        with naming_errors(out_dir), tied_keys_unsaid(trainer.model):  # a full disk names the run's folder
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            # The Trainer turns the KV cache off for training; the saved model generates with it.
            trainer.model.config.use_cache = True
            _save_model(trainer, out_dir)
        seconds = time.monotonic() - start
        held_out = trainer.eval_dataset
        # the kept weights on the held-out records, as the reference's RM script ends
        eval_metrics = _logged(trainer.evaluate(), EVAL_METRICS) if held_out is not None else {}
        # the whole run's logs, a resumed one's restored from its checkpoint
        logs = [row for row in trainer.state.log_history if "loss" in row]
        losses = [float(row["loss"]) for row in logs]
        _, _, effective = batch_layout(hp)
        result = TrainResult(
            kind=kind,
            out_dir=str(out_dir),
            init=init,
            data_path=str(data_path),
            examples=examples,
            skipped=skipped,
            steps=int(trainer.state.global_step),
            epochs=float(trainer.state.epoch or 0.0),
            effective_batch_size=effective,
            first_loss=losses[0] if losses else None,
            final_loss=losses[-1] if losses else None,
            mean_loss=_mean_loss(logs),
            seconds=round(seconds, 3),
            loss_log=str(out_dir / LOSS_LOG_FILE),
            metrics=_logged(logs[-1], METRICS) if logs else {},
            hparams=asdict(hp),
            cut=cut,
            eval_examples=len(held_out) if held_out is not None else 0,
            eval_metrics=eval_metrics,
            best_step=_checkpoint_step(trainer.state.best_model_checkpoint),
        )
        missing = None
        if main:
            missing = _unloadable(out_dir)
            if missing is None:
                result.save()
                _remove_checkpoints(out_dir)  # the finished model replaces them
        # the other processes return once the folder is whole: a caller may load it next (the
        # policy a PPM starts from)
        trainer.accelerator.wait_for_everyone()
    finally:
        if lock is not None:
            os.close(lock)
    if missing is not None:
        raise TrainingError(f"{out_dir}: the trained model was not saved whole ({missing}); with FSDP use "
                            "FULL_STATE_DICT, with DeepSpeed ZeRO-3 stage3_gather_16bit_weights_on_model_save: true")
    return result


def model_file_errors() -> tuple[type[Exception], ...]:
    """What loading or saving a model folder raises for a bad folder or file: safetensors'
    own error (a torn or truncated weights file, a full disk) is neither OSError nor ValueError."""
    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError)


def _save_model(trainer, out_dir: Path) -> None:
    """The model and tokenizer (the Trainer's processing_class) into `out_dir`; safetensors'
    own error for a failed write (a full disk) becomes one that names the folder."""
    from safetensors import SafetensorError

    try:
        trainer.save_model(str(out_dir))
    except SafetensorError as e:
        raise TrainingError(f"{out_dir}: the trained model could not be written ({e})") from e


def _checkpoint_step(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else None


def _mean_loss(logs: list[dict[str, Any]]) -> float | None:
    """The whole run's mean loss from its logged windows (each the mean over the steps since the
    one before), weighted by their steps: the loss logger closes a window at every checkpoint and
    at the last step, so they cover the run, the steps before a resume's checkpoint included."""
    total, last = 0.0, 0
    for row in logs:
        step = int(row["step"])
        total += float(row["loss"]) * (step - last)
        last = step
    return total / last if last else None


def _run_settings(kind: str, init: str, data_path: Path, hp: TrainHParams) -> dict[str, Any]:
    """What a run's checkpoints are trained with: a resume under other settings would mix them."""
    import hashlib

    digest = hashlib.sha256()
    with open(data_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    hparams = {k: v for k, v in asdict(hp).items() if k not in ("progress", "save_steps", "save_total_limit",
                                                                   "logging_steps")}
    return {"kind": kind, "init": init, "data": f"sha256 {digest.hexdigest()[:16]}", "hparams": hparams}


def _resume_point(out_dir: Path, settings: Callable[[], dict[str, Any]], hp: TrainHParams,
                  main: bool) -> Path | None:
    """The checkpoint to go on from, None to start afresh. A run that will write checkpoints
    records its settings beside them, so that a resume under others is refused (`settings`,
    which reads the whole data file, is called only then)."""
    from rstar_fast.files import changed_settings, first_few, write_json

    resume = last_checkpoint(out_dir)
    path = out_dir / SETTINGS_FILE
    if resume is None:
        if main and hp.checkpoint_steps() > 0:
            write_json(path, settings())
        return None
    if path.is_file():  # (checkpoints of an older version have none: resumed unchecked)
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TrainingError(f"{path}: unreadable ({e}); pass --overwrite (overwrite=True) to train "
                                "afresh") from None
        changed = changed_settings(before, json.loads(json.dumps(settings(), default=str)))
        if changed:
            raise TrainingConfigError(
                f"--out {out_dir}: holds the checkpoints of a run with other settings ({first_few(changed, 6, '; ')}); "
                "rerun with those, or pass --overwrite (overwrite=True) to train afresh")
    return resume


def _remove_checkpoints(out_dir: Path) -> None:
    for checkpoint in out_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)
    (out_dir / SETTINGS_FILE).unlink(missing_ok=True)


def last_checkpoint(out_dir: Path) -> Path | None:
    """The newest whole Trainer checkpoint in `out_dir`: its trainer_state.json, written last,
    reads whole. One cut short (a kill or a full disk as it was written) is passed over."""
    numbered = [c for c in out_dir.glob("checkpoint-*") if c.name.split("-")[-1].isdigit()]
    for checkpoint in sorted(numbered, key=lambda c: int(c.name.split("-")[-1]), reverse=True):
        state = checkpoint / "trainer_state.json"
        try:
            if isinstance(json.loads(state.read_text(encoding="utf-8")), dict):
                return checkpoint
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            pass
        log.warning("%s: cut short (a kill or a full disk as it was written); not resumed from", state)
    return None


def _unloadable(out_dir: Path) -> str | None:
    """What a saved model folder lacks to load as a Hugging Face model, or None."""
    if not (out_dir / "config.json").is_file():
        return "no config.json"
    if not any(out_dir.glob("*.safetensors")) and not any(out_dir.glob("pytorch_model*.bin")):
        return "no weights"
    return None
