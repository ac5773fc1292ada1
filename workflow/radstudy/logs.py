"""Logging set-up shared by the command line and the Snakemake scripts."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path


def setup(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=level, handlers=handlers, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.captureWarnings(True)
    if log_file:
        # A rule's log holds its traceback: on a cluster stderr goes to the scheduler's log, and Snakemake 9.27's
        # --show-failed-logs stops at the first empty log of a failed job (the rule's, listed first).
        sys.excepthook = _log_uncaught
        if os.environ.get("SLURM_JOB_ID"):
            logging.getLogger("radstudy").info("SLURM job %s on %s", os.environ["SLURM_JOB_ID"], socket.gethostname())


def _log_uncaught(kind, error, traceback) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, traceback)
        return
    logging.getLogger("radstudy").critical("uncaught %s", kind.__name__, exc_info=(kind, error, traceback))
