"""`rstar-fast train ppm|sft`: the training commands.

    rstar-fast train ppm --pairs FILE --init PATH --out DIR [--learning-rate ...]
    rstar-fast train sft --data FILE --init PATH|tiny --out DIR [--epochs ...]

The top-level parser calls `register(subparsers)`; every hyperparameter field of PPMHParams /
SFTHParams becomes a flag with the reference's value as its default. Launch under `torchrun`
or `accelerate launch` to train on several GPUs; the global batch stays the same.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path

from rstar_fast.training.common import TrainHParams, TrainResult, world_rank
from rstar_fast.training.ppm import PPMHParams
from rstar_fast.training.sft import SFTHParams


def _add_hparam_flags(parser: argparse.ArgumentParser, cls: type[TrainHParams]) -> None:
    group = parser.add_argument_group("hyperparameters (defaults: the reference's)")
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        # SUPPRESS: only flags given on the command line reach the trainer; the dataclass holds defaults.
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(flag, type=type(default), choices=f.metadata.get("choices"), **kwargs)


def _hparams(args: argparse.Namespace, cls: type[TrainHParams]) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def _report(result: TrainResult) -> None:
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    what = "pairs" if result.kind == "ppm" else "examples"
    extra = f", {result.skipped} skipped (too long)" if result.skipped else ""
    if result.eval_metrics:
        kept = "the last step's" if result.best_step in (None, result.steps) else f"step {result.best_step}'s"
        extra += (f"; held out {result.eval_examples}: accuracy {fmt(result.eval_metrics.get('eval_accuracy'))}, "
                  f"loss {fmt(result.eval_metrics.get('eval_loss'))} ({kept} weights kept)")
    print(
        f"{result.kind}: {result.examples} {what}{extra}, {result.steps} steps, "
        f"loss {fmt(result.first_loss)} -> {fmt(result.final_loss)} in {result.seconds:.1f}s; "
        f"saved to {result.out_dir} "
        f"(loss log {result.loss_log})"
    )


def _run(train, data: Path, args: argparse.Namespace, cls: type[TrainHParams]) -> int:
    # Errors (bad data and options are ValueErrors) are reported by the top-level CLI.
    result = train(data, args.init, args.out, overwrite=args.overwrite, **_hparams(args, cls))
    if world_rank() == 0:  # once, not by every process of a distributed run
        _report(result)
    return 0


def _run_ppm(args: argparse.Namespace) -> int:
    from rstar_fast.training.ppm import train_ppm

    return _run(train_ppm, args.pairs, args, PPMHParams)


def _run_sft(args: argparse.Namespace) -> int:
    from rstar_fast.training.sft import train_sft

    return _run(train_sft, args.data, args, SFTHParams)


def register(subparsers) -> argparse.ArgumentParser:
    """Add `train` with `ppm` and `sft` to an argparse subparsers object; return the `train` parser."""
    train = subparsers.add_parser(
        "train",
        help="train the PPM on preference pairs or the policy on SFT data",
        description="Train the process preference model (ppm) or the policy (sft). Checkpoints are "
        "ordinary Hugging Face folders, loadable by the engines as hf:DIR.",
    )
    sub = train.add_subparsers(dest="train_command", required=True, metavar="{ppm,sft}")

    ppm = sub.add_parser(
        "ppm",
        help="train a PPM on {prompt, pos, neg} pairs",
        description="Train a one-output sequence classifier with the pairwise loss "
        "-log sigmoid(r_pos - r_neg), starting from the policy's weights (a new score head).",
    )
    ppm.add_argument(
        "--pairs", type=Path, required=True, help="JSON array or JSON lines of {prompt, pos, neg, ...}"
    )
    ppm.add_argument("--init", required=True, help="policy (causal LM) folder, a PPM folder, or 'tiny'")
    ppm.add_argument("--out", type=Path, required=True, help="output folder for the checkpoint and logs")
    ppm.add_argument("--overwrite", action="store_true",
                     help="train again into an --out that holds a finished checkpoint (train_result.json)")
    _add_hparam_flags(ppm, PPMHParams)
    ppm.set_defaults(func=_run_ppm)

    sft = sub.add_parser(
        "sft",
        help="fine-tune the policy on {query, response} records",
        description="Causal-LM fine-tuning with the loss on the response only (the prompt is masked).",
    )
    sft.add_argument("--data", type=Path, required=True, help="JSON array or JSON lines of {query, response}")
    sft.add_argument("--init", required=True, help="causal LM folder, or 'tiny' for a fresh tiny model")
    sft.add_argument("--out", type=Path, required=True, help="output folder for the checkpoint and logs")
    sft.add_argument("--overwrite", action="store_true",
                     help="train again into an --out that holds a finished checkpoint (train_result.json)")
    _add_hparam_flags(sft, SFTHParams)
    sft.set_defaults(func=_run_sft)
    return train
