"""rstar_fast: fast rStar-Math tree search.

A C++ forest of MCTS trees, a sandboxed step-code executor, pluggable policy and PPM engines,
and a pipelined search driver.
"""

# Public names are added here as their modules land.

__version__ = "0.1.0"

__all__ = ["__version__"]
