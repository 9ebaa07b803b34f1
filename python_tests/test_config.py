"""SearchConfig: presets, reference YAML files as they are, overrides, clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rstar_fast.search import prompts
from rstar_fast.search.config import (
    ConfigError, SearchConfig, add_config_args, config_from_args, get_preset, load_config,
    parse_overrides,
)

# The reference's config/sample_mcts.yaml and config/sft_eval_mcts.yaml, verbatim.
ROUND1_YAML = """\
mode: "mcts"          
model_dir: ""
few_shot_path: "./rstar_deepthink/few_shots/few_shots.json"
prompt_path: "./rstar_deepthink/few_shots/mcts_prompt.json" 
swap_space: 16
temperature: 0.7
errors_threshold: 2   # most allowed consecutive python errors
prompt_wrap: "rstar"
result_unwrap: "rstar"
step_delim: "\\n"
stop: ["<end_of_step>", "<end_of_code>", "<end_of_output>", "<end_of_answer>"]
max_depth: 16
n_generate_sample: 12
best_of: 12
is_sampling: True
iterations: 48
max_tokens: 2048
need_value_func: False
batch_size: 2500
num_few_shot: 2
max_model_len: 4096
c_puct: 2
terminal_sample: True
llm_gpu_memory_utilization: 0.97
tp: 8
"""

EVAL_YAML = """\
mode: "mcts"          
model_dir: "" 
few_shot_path: "./rstar_deepthink/few_shots/few_shots.json"
prompt_path: "./rstar_deepthink/few_shots/sft_prompt.json" 
swap_space: 12
temperature: 1
errors_threshold: 1   # most allowed consecutive python errors
prompt_wrap: "rstar"
result_unwrap: "rstar"
step_delim: "\\n"
stop: ["<end_of_step>", "<end_of_code>", "<end_of_answer>"] # "<end_of_step>",
max_depth: 16
n_generate_sample: 32
best_of: 32
is_sampling: False
iterations: 12
max_tokens: 2048
need_value_func: True
batch_size: 8000
num_few_shot: 0
max_model_len: 4096
update_leaf_value: True
c_puct: 2
"""


def test_presets_match_reference_configs() -> None:
    r1, r2, ev = get_preset("round1"), get_preset("round2"), get_preset("eval")
    assert (r1.n_generate_sample, r1.max_depth, r1.temperature, r1.errors_threshold) == (12, 16, 0.7, 2)
    assert not r1.need_value_func and r1.is_sampling and r1.num_few_shot == 2
    assert "<end_of_output>" in r1.stop and r1.pot_suffix == prompts.MCTS_SUFFIX
    assert (r2.temperature, r2.errors_threshold, r2.need_value_func, r2.update_leaf_value) == (1.0, 1, True, True)
    assert "<end_of_output>" not in r2.stop and r2.pot_suffix == prompts.SFT_SUFFIX
    assert (ev.n_generate_sample, ev.iterations, ev.is_sampling, ev.need_value_func) == (32, 12, False, True)
    assert (ev.max_depth, ev.c_puct, ev.temperature, ev.errors_threshold, ev.update_leaf_value) == (16, 2.0, 1.0, 1, True)
    assert ev.stop == ("<end_of_step>", "<end_of_code>", "<end_of_answer>")
    assert (ev.pot_suffix, ev.pot_format_instructions, ev.num_few_shot) == (prompts.SFT_SUFFIX, "", 0)
    assert prompts.prompt_for("Q?", ev) == \
        "<|user|>:\nQ?\n<|assistant|>: Let's think step by step and solve the problem with code."
    assert get_preset("eval_bs").mode == "bs"


def test_one_few_shot_is_the_reference_s_second_under_a_singular_header() -> None:
    """rstar_prompt_wrap's choice for num_few_shot = 1."""
    p = prompts.build_prompt("Q?", instructions=prompts.MCTS_FORMAT_INSTRUCTIONS, suffix=prompts.MCTS_SUFFIX,
                             few_shots=prompts.FEW_SHOTS, num_few_shot=1, question_delim="\n")
    assert p == "\n".join([prompts.MCTS_FORMAT_INSTRUCTIONS, "The following is a demonstration example.",
                           prompts.FEW_SHOTS[1], "", "Now! It's your turn.\nQuestion: Q?\n"])


def test_reference_yaml_loads_as_is(tmp_path: Path) -> None:
    (tmp_path / "r1.yaml").write_text(ROUND1_YAML)
    (tmp_path / "ev.yaml").write_text(EVAL_YAML)
    r1 = load_config(preset=None, yaml_path=tmp_path / "r1.yaml")
    ref = get_preset("round1")
    for key in ("n_generate_sample", "iterations", "max_depth", "temperature", "errors_threshold", "stop",
                "is_sampling", "need_value_func", "terminal_sample", "num_few_shot", "pot_suffix",
                "pot_format_instructions", "few_shots", "question_delim", "step_delim"):
        assert getattr(r1, key) == getattr(ref, key), key
    ev = load_config(preset="round1", yaml_path=tmp_path / "ev.yaml")
    assert ev.pot_suffix == prompts.SFT_SUFFIX and ev.num_few_shot == 0 and ev.question_delim == ""
    assert (ev.n_generate_sample, ev.iterations, ev.is_sampling, ev.update_leaf_value) == (32, 12, False, True)


# The reference's config/sft_sample_mcts.yaml (rounds 2-4), verbatim: it has no terminal_sample
ROUND2_YAML = EVAL_YAML.replace("n_generate_sample: 32", "n_generate_sample: 12").replace(
    "best_of: 32", "best_of: 12").replace("is_sampling: False", "is_sampling: True").replace(
    "iterations: 12", "iterations: 48").replace("swap_space: 12", "swap_space: 16").replace(
    "batch_size: 8000", "batch_size: 3000").replace(' # "<end_of_step>",', "")


def test_a_reference_yaml_without_a_preset_means_what_it_means_to_the_reference(tmp_path: Path) -> None:
    """`generate --config sft_sample_mcts.yaml` (generate's preset is round1) is the reference's
    round-2 search: a key the file leaves out takes the reference's default (terminal_sample
    False), not round1's (True, which would skip every intermediate step's PPM score)."""
    (tmp_path / "r2.yaml").write_text(ROUND2_YAML)
    parser = argparse.ArgumentParser()
    add_config_args(parser, "round1")
    cfg = config_from_args(parser.parse_args(["--config", str(tmp_path / "r2.yaml")]), default_preset="round1")
    assert cfg == get_preset("round2")
    layered = config_from_args(parser.parse_args(["--config", str(tmp_path / "r2.yaml"), "--preset", "round1"]),
                               default_preset="round1")
    assert layered.terminal_sample  # a preset named with it is layered under it, as asked


@pytest.mark.parametrize("text, levels", [
    # a model named and not run is a surprise; so is a value that would change the reference's search
    ("model_dir: /models/policy\nswap_space: 4\n", {"model_dir": "WARNING", "swap_space": "INFO"}),
    ("prompt_wrap: llama\nuse_beam_search: true\nprune: false\nresult_unwrap: rstar\n",
     {"prompt_wrap": "WARNING", "use_beam_search": "WARNING", "prune": "INFO", "result_unwrap": "INFO"}),
])
def test_an_ignored_reference_key_is_said_aloud_when_it_matters(tmp_path: Path, caplog, text, levels) -> None:
    (tmp_path / "m.yaml").write_text(text)
    with caplog.at_level("INFO", logger="rstar_fast.search.config"):
        load_config(preset="round1", yaml_path=tmp_path / "m.yaml")
    said = {r.getMessage().split("'")[1]: r.levelname for r in caplog.records if "ignoring" in r.getMessage()}
    assert said == levels


def test_prompt_files_are_read_when_they_exist(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"pot_format_instructions": "Solve.", "pot_suffix": "Q: {input}"}')
    (tmp_path / "f.json").write_text('["shot one", "shot two", "shot three"]')
    (tmp_path / "c.yaml").write_text("prompt_path: p.json\nfew_shot_path: f.json\nnum_few_shot: 3\n")
    cfg = load_config(preset="round2", yaml_path=tmp_path / "c.yaml")
    assert cfg.pot_suffix == "Q: {input}" and cfg.few_shots == ("shot one", "shot two", "shot three")


def test_a_prompt_file_and_the_keys_it_sets_are_not_both_given(tmp_path: Path) -> None:
    """Which would win depended on their order in the file; a missing file in a folder of one's
    own is an error, not the reference's embedded copy of a file of that name."""
    (tmp_path / "c.yaml").write_text("pot_suffix: 'MINE {input}'\nprompt_path: ./rstar_deepthink/few_shots/sft_prompt.json\n")
    with pytest.raises(ConfigError, match="prompt_path and pot_suffix are both given"):
        load_config(yaml_path=tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("prompt_path: /my/prompts/sft_prompt.json\n")
    with pytest.raises(ConfigError, match="prompt_path = '/my/prompts/sft_prompt.json': no such file"):
        load_config(yaml_path=tmp_path / "c.yaml")
    for order in ("question_delim: '#'\nprompt_path: sft_prompt.json\n", "prompt_path: sft_prompt.json\nquestion_delim: '#'\n"):
        (tmp_path / "c.yaml").write_text(order)
        cfg = load_config(yaml_path=tmp_path / "c.yaml")
        assert (cfg.question_delim, cfg.pot_suffix) == ("#", prompts.SFT_SUFFIX)


def test_an_ignored_key_set_by_name_is_said_once(caplog) -> None:
    with caplog.at_level("INFO", logger="rstar_fast.search.config"):
        load_config("round2", overrides=parse_overrides(["prompt_wrap=llama", "tp=8"]), overrides_source="--set")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("has no effect here" in m for m in said), said


def test_an_error_says_when_the_key_came_from_the_preset() -> None:
    """--set mode=best_of_n under round1 clashes with the preset's need_value_func: not the user's."""
    with pytest.raises(ConfigError, match=r"^--set: need_value_func = False \(not set here: the preset's"):
        load_config("round1", overrides={"mode": "best_of_n"}, overrides_source="--set")
    with pytest.raises(ConfigError, match=r"^--set: need_value_func = False: best_of_n"):
        load_config("round1", overrides={"mode": "best_of_n", "need_value_func": False}, overrides_source="--set")


def test_a_key_the_mode_does_not_read_is_said(caplog) -> None:
    """`--set c_puct=1` under best_of_n, or bon_n under MCTS, would change nothing silently."""
    with caplog.at_level("WARNING", logger="rstar_fast.search.config"):
        load_config("round2", overrides=parse_overrides(["mode=best_of_n", "c_puct=1", "bon_n=4"]),
                    overrides_source="--set")
        load_config("eval", overrides={"bon_vote": "majority", "n_generate_sample": 4})
    said = [r.getMessage() for r in caplog.records]
    assert said == ["--set c_puct: mode best_of_n does not read it (only mcts)",
                    "overrides bon_vote: mode mcts does not read it (only best_of_n)"], said


def test_overrides_are_typed() -> None:
    cfg = load_config("round2", overrides=parse_overrides(
        ["n_generate_sample=8", "temperature=0.5", "seed=7", "stop=[<end_of_step>, <end_of_answer>]",
         "is_sampling=false", "schedule=lockstep"]))
    assert cfg.n_generate_sample == 8 and cfg.temperature == 0.5 and cfg.seed == 7
    assert cfg.stop == ("<end_of_step>", "<end_of_answer>") and cfg.is_sampling is False
    assert cfg.schedule == "lockstep"
    assert load_config("eval", overrides={"seed": "null"}).seed is None


def test_cli_args() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--preset", "round1", "--set", "iterations=16", "--set", "c_puct=1.5"])
    cfg = config_from_args(args)
    assert cfg.iterations == 16 and cfg.c_puct == 1.5 and cfg.temperature == 0.7


@pytest.mark.parametrize("overrides, words", [
    ({"nonsense": 1}, ["unknown key", "nonsense"]),
    ({"iteratons": 2}, ["unknown key 'iteratons'; did you mean 'iterations'?"]),
    ({"n_generate_sample": "many"}, ["n_generate_sample", "integer"]),
    ({"n_generate_sample": 0}, ["n_generate_sample", ">= 1"]),
    ({"top_p": 0}, ["top_p"]),
    ({"schedule": "async"}, ["schedule", "pipelined"]),
    ({"is_sampling": "maybe"}, ["is_sampling", "true or false"]),
    ({"pot_suffix": "no slot"}, ["pot_suffix", "{input}"]),
    ({"ppm_scale": 2}, ["ppm_scale", "tanh(raw / 5)"]),  # refused, not ignored: the engines use 5
    ({"ppm_scale": 0}, ["ppm_scale", "> 0"]),
    ({"exec_timeout_s": 1e7}, ["exec_timeout_s", "at most 1e+06 seconds"]),  # the executor's own limit
])
def test_bad_values_name_the_key(overrides: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("round2", overrides=overrides)
    for w in words:
        assert w in str(e.value)


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("temperature: hot\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: temperature"):
        load_config(yaml_path=p)
    p.write_text("prompt_path: /nowhere/custom.json\n")
    with pytest.raises(ConfigError, match="prompt_path"):
        load_config(yaml_path=p)
    p.write_bytes(b"\xff\xfeiterations: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: cannot read"):
        load_config(yaml_path=p)
    for key in ("c_puct", "temperature"):
        with pytest.raises(ConfigError, match=f"{key} = nan: must be a finite number"):
            load_config(overrides={key: float("nan")})
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("round9")
    with pytest.raises(ConfigError, match=r"sims_per_tree = 8: must be <= max_in_flight \(4\)"):
        load_config(overrides={"sims_per_tree": 8, "max_in_flight": 4})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["novalue"])


@pytest.mark.parametrize("text, message", [
    ("iterations: -3\n", r"^\S*range\.yaml: iterations = -3: must be >= 1$"),
    ("temperature:\t0.5\nstop: [\"a\n", r"^\S*range\.yaml: not valid YAML: [^\n]*$"),  # one line
])
def test_errors_name_the_file_the_value_came_from_on_one_line(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "range.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(yaml_path=p)


def test_errors_name_the_flag_the_value_came_from() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    with pytest.raises(ConfigError, match=r"^--set: top_p = 0.0: must be in \(0, 1\]$"):
        config_from_args(parser.parse_args(["--set", "top_p=0.0"]))


def test_a_quoted_set_value_is_read_as_yaml_a_bare_one_as_written() -> None:
    """`--set step_delim="\\n"` is a newline, as YAML reads it (it was kept with its quotes);
    a bare value of a text key stays as written, since a prompt may look like YAML."""
    parsed = parse_overrides(['step_delim="\\n"', "question_delim='x: y'", "pot_suffix=Q: [{input}]"])
    assert parsed == {"step_delim": "\n", "question_delim": "x: y", "pot_suffix": "Q: [{input}]"}


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "twice.yaml"
    p.write_text("n_generate_sample: 4\niterations: 8\nn_generate_sample: 8\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml.*'n_generate_sample' is given twice \(first on line 1\)"):
        load_config(yaml_path=p)
    # A key may still override what a YAML merge key (`<<: *anchor`) brings in.
    p.write_text("<<: {iterations: 3, n_generate_sample: 2}\niterations: 5\n")
    cfg = load_config(yaml_path=p)
    assert (cfg.iterations, cfg.n_generate_sample) == (5, 2)


def test_replace_and_defaults_valid() -> None:
    cfg = SearchConfig()
    assert cfg.replace(iterations=3).iterations == 3
    assert cfg.to_dict()["stop"] == list(cfg.stop)
