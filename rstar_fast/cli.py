"""`rstar-fast`: generate trees, evaluate, export training data, train, run the rounds."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import rstar_fast
from rstar_fast.engines.base import EngineError
from rstar_fast.search.config import ConfigError, add_config_args, config_from_args


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit status 2."""


def _add_search_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--problems", default=None, metavar="FILE",
                   help="JSON list, JSONL or local HF dataset with question/answer "
                        "(default: built-in synthetic arithmetic problems)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (trees.jsonl, summary.json)")
    add_config_args(p, default_preset)
    p.set_defaults(default_preset=default_preset)
    p.add_argument("--policy", default="sim", metavar="SPEC",
                   help="policy engine: sim[:k=v,...] | hf:PATH | trtllm:PATH | openai:URL#MODEL (default: sim)")
    p.add_argument("--ppm", default=None, metavar="SPEC",
                   help="PPM engine: sim[:...] | hf:PATH | trtllm:PATH, for presets that score steps (round2, "
                        "eval, eval_bs; with the sim policy the default is sim); round1 takes none")
    p.add_argument("--limit", type=at_least(1, int), default=None, metavar="N", help="search only the first N problems")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="search only the I-th of N disjoint shares of the problems (I from 0), one process each "
                        "(one per GPU), each with its own --out; export reads their trees files together")
    p.add_argument("--exec-workers", type=at_least(1, int), default=None, metavar="N",
                   help="step-code worker processes (default: one per core; with --shard I/N, the cores / N)")
    p.add_argument("--split", default=None, metavar="NAME",
                   help="the split of a dataset folder with several (train, test, ...)")
    p.add_argument("--resume", action="store_true", help="continue OUT/trees.jsonl, skipping finished problems")
    p.add_argument("--schedule", choices=("pipelined", "lockstep"), default=None,
                   help="pipelined (default) or the reference's lockstep levels")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_search(args: argparse.Namespace) -> int:
    from rstar_fast.search.api import FAILED_FILE, RunSummary, search

    cfg = config_from_args(args, default_preset=args.default_preset)
    if args.schedule:
        if any(s.partition("=")[0].strip() == "schedule" for s in args.config_set):
            raise UsageError("--schedule and --set schedule=... are both given: give one of them")
        cfg = cfg.replace(schedule=args.schedule)
    if args.problems is not None and not Path(args.problems).exists():
        raise UsageError(f"--problems {args.problems}: no such file or folder")
    summary = RunSummary()

    async def go() -> None:
        async for _ in search(
            args.problems, cfg, policy=args.policy, ppm=args.ppm, out_dir=args.out,
            resume=args.resume, limit=args.limit, split=args.split, shard=args.shard,
            exec_workers=args.exec_workers, progress=not args.quiet, summary=summary,
        ):
            pass

    asyncio.run(go())
    _print_summary(summary, Path(args.out))
    if args.policy.split(":")[0] == "sim" and summary.graded:  # the default: figures no model earned
        print("(the policy was the simulated engine, which knows each problem's gold answer and errs at a set "
              "rate: these are no model's accuracy; --policy names a model: hf:PATH, trtllm:PATH, "
              "openai:URL#MODEL)")
    if summary.failed:
        print(f"rstar-fast {args.command}: {summary.failed} problem(s) failed and were set aside: "
              f"{Path(args.out) / FAILED_FILE} says why; --resume searches them again", file=sys.stderr)
        return 1
    return 0


def _print_summary(s, out: Path) -> None:  # s: RunSummary
    def count(n: int, thing: str) -> str:
        return f"{n} {thing}{'' if n == 1 else 's'}"

    failed = f", {s.failed} failed" if s.failed else ""
    failed += f", {count(s.unusable, 'malformed problem record')} skipped, as warned above" if s.unusable else ""
    if s.problems == 0 and not s.failed:  # a resume with nothing left: the costs kept are an earlier call's
        print(f"\nnothing left to search: the {count(s.skipped, 'problem')} asked were searched before{failed}")
    else:
        print(f"\n{count(s.problems, 'problem')} searched ({s.skipped} already done{failed}), "
              f"{count(s.rollouts, 'rollout')}, {count(s.nodes, 'node')} in {s.wall_s:.1f} s")
    if s.wall_s > 0 and s.problems:
        print(f"{s.rollouts / s.wall_s:.2f} rollouts/s, {s.generated_tokens / s.wall_s:.0f} generated tokens/s, "
              f"engine busy {s.engine_busy:.0%}, driver {s.driver_s / s.wall_s:.1%} of wall time")
    if s.graded:
        print(f"\nanswers of the {s.graded} graded problems in {out / 'trees.jsonl'}:")
        print("| answer choice | correct | accuracy |\n|---|---|---|")
        print(f"| chosen answer | {s.correct}/{s.graded} | {s.correct / s.graded:.1%} |")
        names = {"pass1": "best-scored answer", "maj": "majority vote (top-k by score)",
                 "wmaj": "score-weighted vote", "passn": "any trajectory (pass@n)"}
        for key, name in names.items():
            k = s.votes.get(key, 0)
            print(f"| {name} | {k}/{s.graded} | {k / s.graded:.1%} |")
    if s.phases:
        print("\nphases (total s adds up the calls' times; calls overlap, so it can pass the wall time)")
        print(f"{'phase':<12}{'calls':>9}{'total s':>10}{'p50 ms':>10}{'p99 ms':>10}")
        for phase, p in s.phases.items():
            print(f"{phase:<12}{p['calls']:>9d}{p['total_s']:>10.2f}{p['p50_ms']:>10.2f}{p['p99_ms']:>10.2f}")
    print(f"\ntrees: {out / 'trees.jsonl'}  summary: {out / 'summary.json'}")


def _run_export(args: argparse.Namespace) -> int:
    from rstar_fast.search.export import export_pairs, export_sft

    if args.kind == "sft":
        n = export_sft(args.trees, args.output, n=args.top)
        print(f"{n} SFT records written to {args.output}")
        why = "no problem there has a correct trajectory without code errors"
    else:
        n = export_pairs(args.trees, args.output, min_margin=args.min_margin, min_edit_distance=args.min_edit_distance,
                         mode=args.mode, final_pairs=args.final_pairs)
        print(f"{n} preference pairs written to {args.output}")
        why = ("no problem there has both a correct and a wrong answer, or no pair passed --min-margin and "
               "--min-edit-distance")
    if n == 0:  # training on it would fail later, further from the cause
        print(f"rstar-fast export {args.kind}: warning: nothing to write: {why}", file=sys.stderr)
    return 0


def _shard(text: str) -> tuple[int, int]:
    """An argparse type: I/N, the I-th (from 0) of N shares."""
    from rstar_fast.search.api import check_shard

    i, _, n = text.partition("/")
    try:
        shard = (int(i), int(n))
        check_shard(shard)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N, as 0/8") from None
    return shard


def at_least(low: float, kind: type) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` that is finite and >= low."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rstar-fast", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--version", action="version", version=f"%(prog)s {rstar_fast.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="search problems and write trees (training data generation)")
    _add_search_args(gen, default_preset="round1")
    gen.set_defaults(func=_run_search)

    ev = sub.add_parser("eval", help="search with the PPM and report accuracy")
    _add_search_args(ev, default_preset="eval")
    ev.set_defaults(func=_run_search)

    ex = sub.add_parser("export", help="export trees to the reference's training formats",
                        description="Export a search's trees to the reference's training formats: policy SFT "
                                    "records (sft) or PPM preference pairs (pairs).")
    kinds = ex.add_subparsers(dest="kind", required=True, metavar="{sft,pairs}")
    sft = kinds.add_parser("sft", help="policy SFT records {query, response}: each problem's best verified traces")
    pairs = kinds.add_parser("pairs", help="PPM preference pairs {prompt, pos, neg, pos_count, neg_count}")
    for p in (sft, pairs):
        p.add_argument("trees", metavar="TREES.jsonl", nargs="+",
                       help="a search's trees; several (the shards of a run) are exported as one")
        p.add_argument("-o", "--output", required=True, metavar="FILE", help=".jsonl: one per line; else a JSON list")
        p.set_defaults(func=_run_export)
    sft.add_argument("--top", type=at_least(1, int), default=2, help="traces kept per problem (default 2)")
    pairs.add_argument("--min-margin", type=at_least(0, float), default=0.5, help="least Q margin (default 0.5)")
    pairs.add_argument("--min-edit-distance", type=at_least(0, int), default=20,
                       help="least edit distance (default 20)")
    pairs.add_argument("--final-pairs", type=at_least(0, int), default=2, metavar="N",
                       help="whole trajectories per side paired for the final answer step (default 2, 0: none)")
    pairs.add_argument("--mode", choices=("all", "vis_count"), default="all",
                       help="walk into every child with both kinds of descendant (all, the default) or only "
                            "the most visited one (vis_count), the reference's two modes")

    # Heavy imports (torch, transformers, TRL) happen only when these commands run.
    from rstar_fast.demo import register as register_demo
    from rstar_fast.engines.serve import register as register_serve
    from rstar_fast.evolve import register as register_evolve
    from rstar_fast.training.cli import register as register_training

    register_training(sub)
    register_evolve(sub)
    register_demo(sub)
    register_serve(sub)
    _verbose_everywhere(sub)
    return parser


def _verbose_everywhere(sub: argparse._SubParsersAction) -> None:
    """`-v` after the command too (`rstar-fast generate ... -v`), where errors say to add it."""
    for p in sub.choices.values():
        if not any("-v" in a.option_strings for a in p._actions):
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more")
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                _verbose_everywhere(a)


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that `args` were parsed by: `train sft`'s, say."""
    for name in (args.command, getattr(args, "train_command", None) or getattr(args, "kind", None)):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if name is None or not subs:
            break
        parser = subs[0].choices[name]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (`argv`: its arguments, sys.argv's by default); returns its exit status.
    The signal handlers and warning format it sets for the command are put back after it, so
    that a script may call it and go on."""
    formatwarning = warnings.formatwarning
    on_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} if on_main_thread else {}
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = formatwarning
        for signum, handler in handlers.items():
            if handler is not None:  # (None: set outside Python, which cannot be put back)
                signal.signal(signum, handler)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, with its usage, not the top level's
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    said = logging.StreamHandler()
    said.setFormatter(_LowercaseLevel("%(levelname)s: %(message)s"))  # "warning: ...", as warnings say it
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[said])
    warnings.formatwarning = _one_line_warning
    # `timeout`, Slurm, `docker stop` and Kubernetes stop a run with SIGTERM, a closed terminal or
    # ssh session with SIGHUP: end it as Ctrl-C does (finished work kept, temporary files
    # removed), not in the middle of a write. Under nohup SIGHUP stays ignored.
    # Only Python's main thread may set handlers: main() called on another thread (from a
    # script's worker) leaves the signals to that script.
    stopped_by = [signal.SIGINT]  # the exit status says which signal stopped the command: 128 + its number

    def stop(signum: int, _frame: object) -> None:
        stopped_by[0] = signal.Signals(signum)
        signal.raise_signal(signal.SIGINT)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            signal.signal(signal.SIGHUP, stop)
        # a script's background job (`cmd &`) starts with SIGINT ignored, which would leave
        # SIGTERM ignored too: take Ctrl-C's handler back
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if getattr(args, "quiet", False):  # the Hugging Face libraries' own bars (weights loaded and
        # saved, a dataset read) too: read from the environment when they are first imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # errors name the whole command: "rstar-fast train ppm: error: ..."
    command = " ".join(filter(None, (args.command, getattr(args, "train_command", None))))
    trees_before = _trees_size(args)  # what finished before this command: hints say only what it added
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ModuleNotFoundError as e:
        extra = _extra_for(e.name or "", args.command)
        if extra is None:
            raise
        print(f"rstar-fast {command}: error: this needs {e.name}, which is not installed: "
              f"pip install 'rstar-fast[{extra}]'", file=sys.stderr)
        return 2
    except (UsageError, ConfigError, ValueError, OSError) as e:  # OSError: a path that cannot be used
        print(f"rstar-fast {command}: error: {_error_message(e)}", file=sys.stderr)
        _resume_hint(args, e, trees_before)
        return 2
    except Exception as e:  # an engine failing (a server down, a model that cannot load), or a bug
        if isinstance(e, EngineError):
            print(f"rstar-fast {command}: error: {_error_message(e)}", file=sys.stderr)
            if isinstance(e.__cause__, ImportError):  # an extra not installed: as a missing module
                return 2
        elif args.verbose:
            traceback.print_exc()
        else:
            print(f"rstar-fast {command}: error: {type(e).__name__}: {_error_message(e)} (-v shows where)",
                  file=sys.stderr)
        _resume_hint(args, e, trees_before)
        return 1
    except KeyboardInterrupt:
        # in a distributed run, the other processes are ended with the first: it says what is left
        from rstar_fast.training.common import world_rank

        hint = _AFTER_INTERRUPT.get(args.command, "") if world_rank() == 0 else ""
        if args.command in ("generate", "eval") and not (_trees_size(args) or 0) > (trees_before or 0):
            hint = ": no problem finished in this run" + ("; rerun with --resume to continue" if trees_before else "")
        with contextlib.suppress(OSError):  # a hung-up terminal (SIGHUP) takes no more output
            print(f"interrupted{hint}", file=sys.stderr)
        return 128 + stopped_by[0]


# the optional extra (pyproject.toml) that installs each package a command may need
_EXTRAS = {"torch": "hf", "transformers": "hf", "accelerate": "hf", "tokenizers": "hf", "safetensors": "hf",
           "trl": "train", "datasets": "train", "aiohttp": "serve", "httpx": "openai", "tensorrt_llm": "trtllm",
           "deepspeed": "deepspeed"}
_COMMAND_EXTRAS = {"train": "train", "evolve": "train", "demo": "train", "serve": "serve"}  # one that holds it all


def _extra_for(module: str, command: str) -> str | None:
    """The extra to install for a missing module, None when no extra holds it."""
    extra = _EXTRAS.get(module.split(".")[0])
    return _COMMAND_EXTRAS.get(command, extra) if extra == "hf" else extra  # train and serve hold hf


def _trees_size(args: argparse.Namespace) -> int | None:
    """The size of a search command's OUT/trees.jsonl (None: none there, or not a search)."""
    from rstar_fast.search.api import TREES_FILE

    if args.command not in ("generate", "eval") or not getattr(args, "out", None):
        return None
    trees = Path(args.out) / TREES_FILE
    return trees.stat().st_size if trees.is_file() else None


def _resume_hint(args: argparse.Namespace, error: BaseException, trees_before: int | None) -> None:
    """After a search failed part way: the problems it finished are in OUT/trees.jsonl. Not when
    it finished none (an error before the search began: the trees there are an earlier run's),
    nor when the error is that OUT is another run's or holds other problems: --resume would fail
    alike."""
    from rstar_fast.search.api import TREES_FILE, OutputHasResultsError, OutputInUseError, ResumeMismatchError
    from rstar_fast.search.records import TreesFileError

    # --resume would fail alike (another run's folder, other problems, a damaged trees file, a
    # file it may not write), or is said already
    said = (OutputInUseError, ResumeMismatchError, OutputHasResultsError, TreesFileError, PermissionError)
    now = _trees_size(args)
    if now is not None and now > (trees_before or 0) and not isinstance(error, said):
        print(f"finished problems are saved in {Path(args.out) / TREES_FILE}; rerun with --resume to continue",
              file=sys.stderr)


def _error_message(e: BaseException) -> str:
    """An error's message with its notes (which problem it came from), on one line. An
    OSError reads "PATH: what" ("afile: File exists"), not "[Errno 17] File exists: 'afile'"."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None and type(e).__str__ is OSError.__str__:
        text = f"{e.filename}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 else "")
        if isinstance(e, FileExistsError) and not Path(e.filename).is_dir():
            text += " and is not a folder"
    else:
        text = str(e)
    notes = getattr(e, "__notes__", None)
    return f"{text} ({'; '.join(notes)})" if notes else text


class _LowercaseLevel(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()}))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # type: ignore[no-untyped-def]
    return f"warning: {message}\n"


# What an interrupted command leaves, by command.
_AFTER_INTERRUPT = {
    "generate": ": finished problems are saved; rerun with --resume to continue",
    "eval": ": finished problems are saved; rerun with --resume to continue",
    "evolve": ": finished stages are saved; rerun the same command to continue",
    "demo": ": finished stages are saved; rerun the same command to continue",
    "train": ": the model is unfinished; rerun the same command (without --overwrite) to go on from "
             "its last checkpoint (--save-steps) or, without one, to train it again",
    "export": ": the output file was left as it was",
}


if __name__ == "__main__":
    sys.exit(main())
