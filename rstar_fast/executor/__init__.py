"""Sandboxed, pre-forked execution of model-written step code (see StepExecutor)."""

from rstar_fast.executor.pool import (
    ExecResult,
    ExecutorClosedError,
    ExecutorError,
    StepExecutor,
    WorkerStartError,
)

__all__ = ["ExecResult", "ExecutorClosedError", "ExecutorError", "StepExecutor",
           "WorkerStartError"]
