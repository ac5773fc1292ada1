"""The suite's end-to-end studies, run in background processes while the other tests run.

Most of the suite is single-threaded; the end-to-end studies (the shared CT tiny study, the tiny MRI study) are
snakemake runs of minutes. `start` launches each study that a collected test needs (`tests/workflow/tiny_study.py
KIND WORKDIR` in a process of its own) right after collection; `wait_for` (the studies' fixtures) waits for it, or
runs it there and then if it was not started. `stop_all` ends any still running when the session ends.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "workflow" / "tiny_study.py"
# study kind -> the session fixture that reads it
FIXTURES = {"ct": "tiny_study", "mri": "tiny_mri_study"}
_RUNNING: dict[str, tuple[subprocess.Popen, Path]] = {}
_LOGS: dict[str, object] = {}  # each run's log file, closed once it has finished


def start(kind: str, tmp_path_factory) -> None:
    if kind in _RUNNING:
        return
    workdir = tmp_path_factory.mktemp(f"tiny_{kind}_study")
    _LOGS[kind] = open(workdir.parent / f"tiny_{kind}_study.log", "w")  # noqa: SIM115 (the process writes it)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), kind, str(workdir)], stdout=_LOGS[kind],
                            stderr=subprocess.STDOUT, cwd=workdir)
    _RUNNING[kind] = (proc, workdir)


def wait_for(kind: str, tmp_path_factory) -> tuple[Path, int]:
    """(the study's workdir, its exit code) once the run has finished."""
    start(kind, tmp_path_factory)
    proc, workdir = _RUNNING[kind]
    code = proc.wait()
    _LOGS[kind].close()
    return workdir, code


def stop_all() -> None:
    for proc, _ in _RUNNING.values():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    for log in _LOGS.values():
        log.close()
