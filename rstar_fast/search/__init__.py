"""The search's building blocks: config, prompts, step semantics, grading, problems, trees,
exports and test-time voting, and the search itself (`search`, `search_sync`, `SearchRunner`).

`rstar_fast.search(...)` calls `search`: this package is callable, so that the top-level
name is both the function the README shows and the package its modules live in
(`import rstar_fast.search.config` works).
"""

import sys
import types

from rstar_fast.search.config import (
    ConfigError,
    SearchConfig,
    PRESETS,
    add_config_args,
    config_from_args,
    get_preset,
    load_config,
    parse_overrides,
)
from rstar_fast.search.export import ExportError, export_pairs, export_sft, pair_records, sft_records
from rstar_fast.search.grading import Grader, GradingError, agrade, grade
from rstar_fast.search.problems import (
    LoadedProblems,
    MalformedProblemWarning,
    Problem,
    ProblemFileError,
    load_problems,
)
from rstar_fast.search.prompts import build_prompt, prompt_for
from rstar_fast.search.records import (
    DuplicateProblemError,
    TreesFileError,
    TreesWriter,
    build_rstar_dict,
    finished_ids,
    read_trees,
    tree_record,
)
from rstar_fast.search.steps import (
    ParsedStep,
    StepOutcome,
    code_failed,
    finish_step,
    parse_step,
    select_samples,
    step_code,
)
from rstar_fast.search.voting import Candidate, best_answer, evaluate, majority_vote, weighted_vote
from rstar_fast.search.driver import SearchResult, SearchRunner  # noqa: E402  (after its building blocks)
from rstar_fast.search.api import (  # noqa: E402
    OutputHasResultsError,
    OutputInUseError,
    ResumeMismatchError,
    RunSummary,
    search,
    search_sync,
)



class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = [
    "ConfigError", "SearchConfig", "PRESETS", "add_config_args", "config_from_args", "get_preset",
    "load_config", "parse_overrides", "ExportError", "export_pairs", "export_sft", "pair_records",
    "sft_records", "Grader", "GradingError", "agrade", "grade", "LoadedProblems",
    "MalformedProblemWarning", "Problem", "ProblemFileError", "load_problems", "build_prompt",
    "prompt_for", "DuplicateProblemError", "TreesFileError", "TreesWriter", "build_rstar_dict",
    "finished_ids", "read_trees", "tree_record", "ParsedStep", "StepOutcome", "code_failed",
    "finish_step", "parse_step", "select_samples", "step_code", "Candidate", "best_answer",
    "evaluate", "majority_vote", "weighted_vote", "SearchResult", "SearchRunner", "RunSummary",
    "search", "search_sync", "OutputInUseError", "OutputHasResultsError", "ResumeMismatchError",
]
