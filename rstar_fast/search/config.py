"""Search configuration: every key of the reference's YAML configs, plus the scheduler's own.

Presets reproduce the reference configs (microsoft/rStar, branch rStar-math):
`round1` = `config/sample_mcts.yaml` (terminal-guided bootstrap, instruction prompt with two
few-shots, no PPM), `round2` = `config/sft_sample_mcts.yaml` (rounds 2-4: PPM-initialised Q,
ground-truth terminal rewards), `eval` = `config/sft_eval_mcts.yaml` (PPM-backed, no ground
truth) and `eval_bs` = `config/sft_eval_bs.yaml` (step-level beam search). The
`best_of_n` mode (ours: the reference has none) samples `bon_n` independent solutions and
picks one by PPM score or majority vote (`rstar_fast/search/baselines.py`).

`load_config(preset=..., yaml_path=..., overrides=...)` layers a preset, a YAML file and
`key=value` overrides; a YAML file without a preset starts from the reference's own defaults
(`REFERENCE_DEFAULTS`). Reference YAML files load as they are: keys that only tune the
reference's own machinery (vLLM memory, tensor parallelism, batch sizes) are accepted and
ignored with a note, and `prompt_path` / `few_shot_path` are read (or, when they name the
reference's own files, mapped to the copies embedded in `prompts.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import math
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rstar_fast.executor.pool import MAX_TIMEOUT_S as MAX_EXEC_TIMEOUT_S
from rstar_fast.search import prompts as _prompts
from rstar_fast.search.steps import ANSWER_END, CODE_END, OUTPUT_END, STEP_END

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration key or value the search cannot use; the message names the key and where."""


@dataclass
class SearchConfig:
    """One search's settings. Field names follow the reference's `BaseConfig` where it has one."""

    # --- the reference's keys ---
    # MCTS, step-level beam search guided by the PPM, or best-of-N (ours, see bon_* below)
    mode: Literal["mcts", "bs", "best_of_n"] = "mcts"
    n_generate_sample: int = 12  # candidate steps sampled per expansion (B2 in the paper)
    iterations: int = 48  # MCTS rollouts per problem
    max_depth: int = 16  # a node deeper than this becomes terminal (TOO_MANY_STEPS)
    c_puct: float = 2.0  # exploration constant of UCT
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k cut
    max_tokens: int = 2048  # per generated step
    seed: int | None = None
    errors_threshold: int = 2  # consecutive code errors that make a node terminal
    positive_reward: float = 1.0
    negative_reward: float = -1.0
    stop: tuple[str, ...] = (STEP_END, CODE_END, OUTPUT_END, ANSWER_END)
    step_delim: str = "\n"  # between a code step and its `<output>` block
    step_beam_width: int = 1  # beam size of `bs` mode (B1 in the paper)
    is_sampling: bool = True  # terminal rewards from the ground truth (data generation)
    need_value_func: bool = False  # score steps with the PPM
    update_leaf_value: bool = False  # PPM score of each new child counts as its first visit
    # with update_leaf_value, only answers get a first value, not intermediate steps (the
    # reference's select_next_step passes over them); round 1 has no leaf values either way
    terminal_sample: bool = False
    max_model_len: int = 4096  # a path and its next step stay within it; PPM prompts are cut to it
    # prompt: instruction text, suffix with an `{input}` slot, few-shot solutions
    pot_format_instructions: str = _prompts.SFT_FORMAT_INSTRUCTIONS
    pot_suffix: str = _prompts.SFT_SUFFIX
    few_shots: tuple[str, ...] = _prompts.FEW_SHOTS
    num_few_shot: int = 0
    question_delim: str = ""  # appended to the question before it fills `{input}`

    # --- ours ---
    sims_per_tree: int = 1  # simulations in flight per tree; 1 = the reference's exact order
    max_in_flight: int = 4096  # simulations in flight across the forest
    virtual_loss: float = 1.0  # subtracted from Q of a node while a simulation passes through it
    schedule: Literal["pipelined", "lockstep"] = "pipelined"
    selection: Literal["uct", "puct"] = "uct"
    exec_timeout_s: float = 30.0  # step code wall-clock limit (the reference's tool uses 30 s)
    # a policy or PPM call still unanswered after this long stops the run, finished problems
    # kept (a hung server or engine would otherwise hold it for ever); 0: no limit
    engine_timeout_s: float = 0.0
    error_rule: Literal["raised", "substring"] = "raised"  # code fails when it raises / prints "error"
    top_k_vote: int = 4  # answers (by PPM score) that enter the majority vote at test time
    # PPM score = tanh(raw / ppm_scale), which the engines compute with 5 (DESIGN); another value
    # is refused rather than silently ignored
    ppm_scale: float = 5.0
    bon_n: int = 32  # best_of_n: independent solutions sampled per problem
    bon_vote: Literal["ppm", "majority"] = "ppm"  # best_of_n: best PPM score, or majority of all N

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "SearchConfig", given: Collection[str] | None = None) -> None:
        """Raise ConfigError naming the first key whose value the search cannot use; `given`:
        the keys `where` set, so that a value it did not set is said to come from before."""

        def bad(key: str, why: str) -> ConfigError:
            unset = " (not set here: the preset's or an earlier file's)" if given is not None and key not in given else ""
            return ConfigError(f"{where}: {key} = {getattr(self, key)!r}{unset}: {why}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f.name, "must be a finite number")
        for key in ("n_generate_sample", "iterations", "max_tokens", "step_beam_width",
                    "sims_per_tree", "max_in_flight", "max_model_len", "top_k_vote", "bon_n"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        if self.max_depth < 1:
            raise bad("max_depth", "must be >= 1")
        if self.sims_per_tree > self.max_in_flight:  # one tree alone would run more than that
            raise bad("sims_per_tree", f"must be <= max_in_flight ({self.max_in_flight})")
        for f in dataclasses.fields(self):  # the C++ core holds counts as 32-bit integers
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and f.name != "seed" and value >= 2**31:
                raise bad(f.name, "must be < 2**31")
        if self.errors_threshold < 0:
            raise bad("errors_threshold", "must be >= 0")
        if self.num_few_shot < 0 or self.num_few_shot > len(self.few_shots):
            raise bad("num_few_shot", f"must be between 0 and {len(self.few_shots)} (the few-shots given)")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise bad("top_k", "must be -1 (off) or >= 1")
        if self.c_puct < 0 or self.virtual_loss < 0 or self.exec_timeout_s <= 0 or self.ppm_scale <= 0:
            for key in ("c_puct", "virtual_loss"):
                if getattr(self, key) < 0:
                    raise bad(key, "must be >= 0")
            for key in ("exec_timeout_s", "ppm_scale"):
                if getattr(self, key) <= 0:
                    raise bad(key, "must be > 0")
        if self.engine_timeout_s < 0:
            raise bad("engine_timeout_s", "must be >= 0 (0: no limit)")
        if self.exec_timeout_s > MAX_EXEC_TIMEOUT_S:
            raise bad("exec_timeout_s", f"must be at most {MAX_EXEC_TIMEOUT_S:g} seconds (the executor's limit)")
        if self.ppm_scale != 5.0:
            raise bad("ppm_scale", "the PPM engines score tanh(raw / 5); no other scale is supported")
        if not self.stop or any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be a non-empty list of non-empty strings")
        if "{input}" not in self.pot_suffix:
            raise bad("pot_suffix", "needs an {input} slot for the question")
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise bad(key, f"must be one of {', '.join(allowed)}")
        if self.mode == "bs" and not self.need_value_func:
            raise bad("need_value_func", "bs mode ranks steps by the PPM, so it needs need_value_func: true")
        if self.mode == "best_of_n" and self.bon_vote == "ppm" and not self.need_value_func:
            raise bad("need_value_func", "best_of_n with bon_vote: ppm picks answers by the PPM, so it needs "
                      "need_value_func: true (or bon_vote: majority)")
        if self.mode != "mcts" and self.schedule == "lockstep":
            raise bad("schedule", f"mode {self.mode} runs pipelined only (lockstep is the MCTS comparison)")

    def replace(self, **changes: Any) -> SearchConfig:
        """A copy with some fields changed (typed and validated like a YAML override)."""
        return _apply(self, changes, "replace()")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["few_shots"] = list(self.few_shots)
        return d

    @property
    def uses_ppm(self) -> bool:
        return self.need_value_func


_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("mcts", "bs", "best_of_n"),
    "bon_vote": ("ppm", "majority"),
    "schedule": ("pipelined", "lockstep"),
    "selection": ("uct", "puct"),
    "error_rule": ("raised", "substring"),
}

_ROUND1_STOP = (STEP_END, CODE_END, OUTPUT_END, ANSWER_END)
_SFT_STOP = (STEP_END, CODE_END, ANSWER_END)

PRESETS: dict[str, dict[str, Any]] = {
    # config/sample_mcts.yaml: round 1, terminal-guided, instruction prompt + 2 few-shots, no PPM
    "round1": dict(
        mode="mcts", n_generate_sample=12, iterations=48, max_depth=16, temperature=0.7,
        errors_threshold=2, stop=_ROUND1_STOP, is_sampling=True, need_value_func=False,
        update_leaf_value=False, terminal_sample=True, num_few_shot=2,
        pot_format_instructions=_prompts.MCTS_FORMAT_INSTRUCTIONS, pot_suffix=_prompts.MCTS_SUFFIX,
        question_delim="\n",
    ),
    # config/sft_sample_mcts.yaml: rounds 2-4, PPM-initialised Q, ground-truth terminal rewards
    "round2": dict(
        mode="mcts", n_generate_sample=12, iterations=48, max_depth=16, temperature=1.0,
        errors_threshold=1, stop=_SFT_STOP, is_sampling=True, need_value_func=True,
        update_leaf_value=True, terminal_sample=False, num_few_shot=0,
        pot_format_instructions=_prompts.SFT_FORMAT_INSTRUCTIONS, pot_suffix=_prompts.SFT_SUFFIX,
        question_delim="",
    ),
    # config/sft_eval_mcts.yaml: test time, PPM-backed answers, no ground truth
    "eval": dict(
        mode="mcts", n_generate_sample=32, iterations=12, max_depth=16, temperature=1.0,
        errors_threshold=1, stop=_SFT_STOP, is_sampling=False, need_value_func=True,
        update_leaf_value=True, terminal_sample=False, num_few_shot=0,
        pot_format_instructions=_prompts.SFT_FORMAT_INSTRUCTIONS, pot_suffix=_prompts.SFT_SUFFIX,
        question_delim="",
    ),
    # config/sft_eval_bs.yaml: step-level beam search guided by the PPM
    "eval_bs": dict(
        mode="bs", n_generate_sample=8, step_beam_width=8, iterations=1, max_depth=16,
        temperature=1.0, errors_threshold=1, stop=_SFT_STOP, is_sampling=False,
        need_value_func=True, update_leaf_value=True, terminal_sample=False, num_few_shot=0,
        pot_format_instructions=_prompts.SFT_FORMAT_INSTRUCTIONS, pot_suffix=_prompts.SFT_SUFFIX,
        question_delim="",
    ),
}

# The reference's BaseConfig defaults for its search keys: what it gives a key its YAML file
# leaves out (sft_sample_mcts.yaml has no terminal_sample: False there, True in round1).
REFERENCE_DEFAULTS: dict[str, Any] = dict(
    mode="mcts", num_few_shot=0, step_delim="\n", temperature=0.7, top_p=1.0, top_k=-1, max_tokens=2048,
    seed=None, n_generate_sample=1, step_beam_width=1, max_depth=4, iterations=1, positive_reward=1.0,
    negative_reward=-1.0, errors_threshold=0, need_value_func=False, update_leaf_value=False, c_puct=2.0,
    is_sampling=False, max_model_len=8192, terminal_sample=False,
)

# Reference keys that tune only the reference's own machinery: accepted, ignored, noted.
IGNORED_KEYS: dict[str, str] = {
    "model_dir": "give the policy with --policy",
    "reward_model_dir": "give the PPM with --ppm",
    "prompt_wrap": "only the rstar prompt exists",
    "result_unwrap": "only the rstar step parser exists",
    "swap_space": "vLLM setting",
    "best_of": "vLLM setting (n_generate_sample sets the samples)",
    "use_beam_search": "vLLM decoding setting",
    "batch_size": "the pipelined driver needs no problem batches",
    "llm_gpu_memory_utilization": "engine setting",
    "tp": "engine setting",
    "prune": "offline pruning is not part of the search",
    "save_intermediate_rollouts": "trees.jsonl is written as problems finish",
}

# Ignored reference keys whose other values would change the reference's search: said aloud.
_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "prompt_wrap": ("rstar",), "result_unwrap": ("rstar",), "use_beam_search": (False,), "prune": (False,)}

# Keys that only some modes read: one set by name under another mode is said aloud, as it
# would otherwise change nothing without a word.
_MODE_KEYS: dict[str, tuple[str, ...]] = {
    "iterations": ("mcts",), "c_puct": ("mcts",), "sims_per_tree": ("mcts",), "virtual_loss": ("mcts",),
    "selection": ("mcts",), "n_generate_sample": ("mcts", "bs"), "step_beam_width": ("bs",),
    "bon_n": ("best_of_n",), "bon_vote": ("best_of_n",)}

# The reference's own prompt files, by file name, mapped to the embedded copies.
_BUILTIN_PROMPT_FILES: dict[str, dict[str, Any]] = {
    "mcts_prompt.json": dict(pot_format_instructions=_prompts.MCTS_FORMAT_INSTRUCTIONS,
                             pot_suffix=_prompts.MCTS_SUFFIX, question_delim="\n"),
    "sft_prompt.json": dict(pot_format_instructions=_prompts.SFT_FORMAT_INSTRUCTIONS,
                            pot_suffix=_prompts.SFT_SUFFIX, question_delim=""),
}
_BUILTIN_FEW_SHOT_FILES: dict[str, tuple[str, ...]] = {"few_shots.json": _prompts.FEW_SHOTS}

_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(SearchConfig)}
_TYPES: dict[str, Any] = typing.get_type_hints(SearchConfig)


def _coerce(key: str, value: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    hint = _TYPES[key]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail(why: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r}: {why}")

    if origin is typing.Union or (origin is not None and type(None) in args and origin is not tuple):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce_simple(inner, value, fail)
    if origin is Literal:
        if value not in args:
            raise fail(f"must be one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, Sequence):
            raise fail("must be a list of strings")
        if not all(isinstance(v, str) for v in value):
            raise fail("must be a list of strings")
        return tuple(value)
    return _coerce_simple(hint, value, fail)


def _coerce_simple(hint: Any, value: Any, fail: Any) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise fail("must be true or false")
    if hint is int:
        if isinstance(value, bool):
            raise fail("must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise fail("must be an integer")
    if hint is float:
        if isinstance(value, bool):
            raise fail("must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise fail("must be a number") from None
    if hint is str:
        if not isinstance(value, str):
            raise fail("must be a string")
        return value
    return value


def _read_json(path: Path, key: str, where: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: {key} = {str(path)!r}: cannot read it as JSON: {e}") from e


def _resolve_file(value: Any, key: str, where: str, base: Path | None) -> Path | None:
    """An existing file for a path key (as given, or relative to the YAML file), else None."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} = {value!r}: must be a file path")
    for cand in (Path(value), (base / value) if base else None):
        if cand is not None and cand.is_file():
            return cand
    return None


def _builtin_name(value: str, builtins: Mapping[str, Any]) -> str | None:
    """The reference's own file a missing path names (`./rstar_deepthink/few_shots/NAME`, or
    NAME alone), else None: a mistyped folder of one's own is an error, not the embedded copy."""
    path = Path(value)
    if path.name in builtins and path.parent.parts[-2:] in ((), ("rstar_deepthink", "few_shots")):
        return path.name
    return None


# keys a path key sets: given together in one file or --set, which wins would depend on order
_SET_BY_PATH = {"prompt_path": ("pot_format_instructions", "pot_suffix"),
                "few_shot_path": ("few_shots",)}


def _translate(raw: Mapping[str, Any], where: str, base: Path | None) -> dict[str, Any]:
    """Reference keys to our fields: path keys loaded, ignored keys noted, unknown keys refused."""
    for path_key, keys in _SET_BY_PATH.items():
        both = [k for k in keys if k in raw] if path_key in raw else []
        if both:
            raise ConfigError(f"{where}: {path_key} and {both[0]} are both given, and {path_key} sets "
                              f"{both[0]}: give one of them")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in IGNORED_KEYS:
            # a model named in the file and not run, or a value that would change the search
            # there, is a surprise worth saying; the rest is tuning
            changes = key in _NO_OP_VALUES and value not in _NO_OP_VALUES[key]
            say = log.warning if (key in ("model_dir", "reward_model_dir") and value) or changes else log.info
            say("%s: ignoring reference key %r = %r (%s)", where, key, value, IGNORED_KEYS[key])
        elif key == "prompt_path":
            path = _resolve_file(value, key, where, base)
            if path is None:
                name = _builtin_name(value, _BUILTIN_PROMPT_FILES)
                if name is None:
                    raise ConfigError(f"{where}: prompt_path = {value!r}: no such file (and not one of the "
                                      f"reference's own: {', '.join(_BUILTIN_PROMPT_FILES)})")
                for k, v in _BUILTIN_PROMPT_FILES[name].items():  # a question_delim given beside it wins
                    if k == "question_delim":
                        out.setdefault(k, v)
                    else:
                        out[k] = v
            else:
                data = _read_json(path, key, where)
                if not isinstance(data, dict) or "pot_suffix" not in data:
                    raise ConfigError(f"{where}: prompt_path = {value!r}: needs a JSON object with "
                                      "pot_format_instructions and pot_suffix")
                out["pot_format_instructions"] = data.get("pot_format_instructions", "")
                out["pot_suffix"] = data["pot_suffix"]
                # the reference puts the step delimiter after the question (see prompts.py)
                out.setdefault("question_delim", "" if data["pot_suffix"] == _prompts.SFT_SUFFIX else "\n")
        elif key == "few_shot_path":
            path = _resolve_file(value, key, where, base)
            if path is None:
                name = _builtin_name(value, _BUILTIN_FEW_SHOT_FILES)
                if name is None:
                    raise ConfigError(f"{where}: few_shot_path = {value!r}: no such file (and not the "
                                      f"reference's own: {', '.join(_BUILTIN_FEW_SHOT_FILES)})")
                out["few_shots"] = _BUILTIN_FEW_SHOT_FILES[name]
            else:
                data = _read_json(path, key, where)
                if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
                    raise ConfigError(f"{where}: few_shot_path = {value!r}: needs a JSON list of strings")
                out["few_shots"] = tuple(data)
        elif key in _FIELDS:
            out[key] = value
        else:
            raise ConfigError(f"{where}: unknown key {key!r}{_did_you_mean(key)} (known: {', '.join(sorted(_FIELDS))})")
    return out


def _apply(cfg: SearchConfig, raw: Mapping[str, Any], where: str, base: Path | None = None) -> SearchConfig:
    fields = _translate(raw, where, base)
    typed = {k: _coerce(k, v, where) for k, v in fields.items()}
    new = copy.copy(cfg)  # not dataclasses.replace, whose __post_init__ would validate unnamed
    for key, value in typed.items():
        setattr(new, key, value)
    new.validate(where, typed.keys())  # once, naming where the values came from
    return new


def _did_you_mean(key: Any) -> str:
    close = difflib.get_close_matches(str(key), [*_FIELDS, *IGNORED_KEYS], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def get_preset(name: str) -> SearchConfig:
    """The preset of that name (`round1`, `round2`, `eval`, `eval_bs`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return SearchConfig(**PRESETS[name])


def _load_yaml_strict(stream: Any) -> Any:
    """`yaml.safe_load`, but a key given twice in one mapping is an error (PyYAML keeps the
    last silently, so a config's earlier setting would vanish without a word)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` keys are meant to be overridden
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    first = seen[key].start_mark.line + 1
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first on line {first})", key_node.start_mark)
                seen[key] = key_node
            return super().construct_mapping(node, deep=deep)

    return yaml.load(stream, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def load_config(
    preset: str | None = "round2",
    yaml_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    overrides_source: str = "overrides",
    warn_unread: bool = True,
) -> SearchConfig:
    """A preset, then a YAML file (reference configs load as they are), then overrides. A YAML
    file without a preset starts from the reference's defaults (REFERENCE_DEFAULTS), so that it
    means what it means to the reference. `warn_unread`: warn of overrides the mode does not read
    (a caller that reads the same config again passes False after its first read)."""
    import yaml

    if preset:
        cfg = get_preset(preset)
    else:
        cfg = SearchConfig(**REFERENCE_DEFAULTS) if yaml_path is not None else SearchConfig()
    if yaml_path is not None:
        path = Path(yaml_path)
        try:
            with path.open(encoding="utf-8") as f:  # a file stream: errors name the path
                raw = _load_yaml_strict(f)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config file: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping of keys to values")
        cfg = _apply(cfg, raw, str(path), path.parent)
    if overrides:
        cfg = _apply(cfg, overrides, overrides_source)
        for key in overrides if warn_unread else ():
            if key in _MODE_KEYS and cfg.mode not in _MODE_KEYS[key]:
                log.warning("%s %s: mode %s does not read it (only %s)", overrides_source, key, cfg.mode,
                            " and ".join(_MODE_KEYS[key]))
    return cfg


def _quoted(text: str) -> bool:
    """A YAML quoted scalar ("\\n" is a newline in one): read as YAML, not kept as written."""
    t = text.strip()
    return len(t) >= 2 and t[0] == t[-1] and t[0] in "'\""


def parse_overrides(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """`["key=value", ...]` (values in YAML syntax: `stop=[a, b]`, `seed=null`) to a dict;
    errors name `flag`, the option the items came from."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        if key not in _FIELDS and key not in IGNORED_KEYS and key not in ("prompt_path", "few_shot_path"):
            raise ConfigError(f"{flag} {item!r}: unknown key {key!r}{_did_you_mean(key)} "
                              f"(known: {', '.join(sorted(_FIELDS))})")
        if key in IGNORED_KEYS:  # asked for by name: said out loud here, once, and left out
            log.warning("%s %s: the reference key %r has no effect here (%s)", flag, item, key, IGNORED_KEYS[key])
            continue
        if key in _TYPES and _TYPES[key] is str and not _quoted(text):
            out[key] = text  # strings stay verbatim (a prompt may look like YAML), unless quoted
            continue
        try:
            out[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{flag} {item!r}: value is not valid YAML: {e}") from e
    return out


def add_config_args(parser: Any, default_preset: str | None = None) -> None:
    """Add `--preset`, `--config` and repeatable `--set KEY=VALUE` to an argparse parser."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="reference config to start from (round1, round2, eval, eval_bs)"
                             + (f"; default {default_preset}" if default_preset else ""))
    parser.add_argument("--config", dest="config_yaml", default=None, metavar="YAML",
                        help="YAML config (the reference's config files load as they are; without "
                             "--preset, keys it leaves out take the reference's defaults)")
    parser.add_argument("--set", dest="config_set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set n_generate_sample=8")


def config_from_args(args: Any, default_preset: str = "round2") -> SearchConfig:
    """The SearchConfig that `add_config_args` options describe: a `--config` file without
    `--preset` is read as the reference reads it, not over the default preset."""
    yaml_path = getattr(args, "config_yaml", None)
    return load_config(
        preset=getattr(args, "preset", None) or (None if yaml_path else default_preset),
        yaml_path=yaml_path,
        overrides=parse_overrides(getattr(args, "config_set", []) or []),
        overrides_source="--set",
    )


__all__ = [
    "ConfigError", "SearchConfig", "PRESETS", "REFERENCE_DEFAULTS", "IGNORED_KEYS", "get_preset", "load_config",
    "parse_overrides", "add_config_args", "config_from_args",
]
