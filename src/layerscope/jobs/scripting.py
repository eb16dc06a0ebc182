"""Glue for workflow scripts: log to the rule's log file, turn user errors into clean exits."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from layerscope.errors import LayerscopeError, environment_error


@contextlib.contextmanager
def job_logging(log_path: str | Path | None, name: str = "layerscope") -> Iterator[logging.Logger]:
    """Log to ``log_path`` (and stderr); on a LayerscopeError print just its message and exit 1.

    A user error (bad input, bad config) gets one readable line, not a traceback; anything
    else is a bug and keeps its traceback in the log.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    start = time.perf_counter()
    try:
        yield logger
    except LayerscopeError as exc:
        logger.error("%s", exc)
        _close(logger)
        sys.exit(1)
    except Exception as exc:
        user_error = environment_error(exc, **_job_files())
        if user_error is not None:  # a full disk, a corrupt weights file: the user's to fix
            logger.error("%s", user_error)
            _close(logger)
            sys.exit(1)
        logger.exception("unexpected error (a bug in layerscope; please report it with this log)")
        _close(logger)
        raise
    logger.info("done in %.1f s", time.perf_counter() - start)
    _close(logger)


def _job_files() -> dict[str, list[str]]:
    """The running Snakemake job's input and output files (its ``snakemake`` object lives in the
    script's ``__main__``), to name them in messages; empty outside a workflow script."""
    job = getattr(sys.modules.get("__main__"), "snakemake", None)
    if job is None:
        return {"inputs": [], "outputs": []}
    return {"inputs": [str(f) for f in job.input], "outputs": [str(f) for f in job.output]}


def log_visible_gpus(logger: logging.Logger) -> None:
    """Log which GPUs the scheduler exposed, so a cluster job's log shows what it ran on."""
    import os

    logger.info("CUDA_VISIBLE_DEVICES=%s", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))


def _close(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
