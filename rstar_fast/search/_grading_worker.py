"""A grading worker process (`python -m rstar_fast.search._grading_worker COMPARE`, started by
grading.Grader). Its own module: run as `-m rstar_fast.search.grading`, the module the package
already imported would run a second time."""

import sys

from rstar_fast.search.grading import _serve

if __name__ == "__main__":
    _serve(sys.argv[1] if len(sys.argv) > 1 else "rstar_fast.search.grading:math_verify_equal")
