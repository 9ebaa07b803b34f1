"""rstar_fast: fast rStar-Math tree search.

A C++ forest of MCTS trees, a sandboxed step-code executor, pluggable policy and PPM engines,
and a pipelined search driver.
"""

from importlib.metadata import version as _version

from rstar_fast._core import Forest, ForestError
from rstar_fast.executor import ExecResult, StepExecutor
from rstar_fast import search  # the package, callable as the search function (see its docstring)
from rstar_fast.search import SearchConfig, load_config
from rstar_fast.search.api import search_sync
from rstar_fast.search.grading import grade
from rstar_fast.synthetic import SyntheticError, generate_problems, split_problems, train_test_problems
from rstar_fast.training import TrainResult, train_ppm, train_sft

__version__ = _version("rstar-fast")  # pyproject.toml's, the one place it is set

__all__ = [
    "ExecResult",
    "Forest",
    "ForestError",
    "SearchConfig",
    "StepExecutor",
    "SyntheticError",
    "TrainResult",
    "__version__",
    "generate_problems",
    "grade",
    "load_config",
    "search",
    "search_sync",
    "split_problems",
    "train_ppm",
    "train_sft",
    "train_test_problems",
]
