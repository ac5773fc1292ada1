"""The suite's end-to-end studies, run in background processes while the other tests run.

Most of the suite is single-threaded; the end-to-end studies (the shared CT tiny study, the tiny MRI study) are
snakemake runs of minutes. `start` launches each study that a collected test needs (`tests/workflow/tiny_study.py
KIND WORKDIR` in a process of its own) right after collection; `wait_for` (the studies' fixtures) waits for it, or
runs it there and then if it was not started. `stop_all` ends any still running when the session ends.

The SLURM runs of the shared tiny study (`tests/workflow/test_slurm.py slurm WORKDIR CT_WORKDIR`) need that study
finished: their process starts right after collection too (it installs and starts the test cluster meanwhile) and
is told the study's exit code on its stdin once the study has finished; mostly waiting on SLURM's status polls,
the runs then overlap with the tests that read the study.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SCRIPTS = {"ct": TESTS / "workflow" / "tiny_study.py", "mri": TESTS / "workflow" / "tiny_study.py",
           "slurm": TESTS / "workflow" / "test_slurm.py"}
CLUSTER_SCRIPT = TESTS / "slurm" / "local_cluster.sh"
# study kind -> the session or module fixture that reads it
FIXTURES = {"ct": "tiny_study", "mri": "tiny_mri_study", "slurm": "slurm_runs"}
AFTER = {"slurm": "ct"}  # kind -> the study it runs on: that study's workdir is its argument, its exit code its stdin
_RUNNING: dict[str, tuple[subprocess.Popen, Path]] = {}
_LOGS: dict[str, object] = {}  # each run's log file, closed once it has finished


def start(kind: str, tmp_path_factory) -> None:
    if kind in _RUNNING:
        return
    after = AFTER.get(kind)
    if after:
        start(after, tmp_path_factory)
    workdir = tmp_path_factory.mktemp(f"tiny_{kind}_study")
    _LOGS[kind] = open(workdir.parent / f"tiny_{kind}_study.log", "w")  # noqa: SIM115 (the process writes it)
    args = [str(_RUNNING[after][1])] if after else []
    proc = subprocess.Popen([sys.executable, str(SCRIPTS[kind]), kind, str(workdir), *args], stdout=_LOGS[kind],
                            stderr=subprocess.STDOUT, cwd=workdir,
                            stdin=subprocess.PIPE if after else subprocess.DEVNULL)
    _RUNNING[kind] = (proc, workdir)
    if after:
        threading.Thread(target=_tell_exit_code, args=(_RUNNING[after][0], proc), daemon=True).start()


def _tell_exit_code(study: subprocess.Popen, waiting: subprocess.Popen) -> None:
    """Once `study` has finished, write its exit code to the stdin of the process that waits for it."""
    code = study.wait()
    try:
        waiting.stdin.write(f"{code}\n".encode())
        waiting.stdin.close()
    except OSError:  # it has ended already (it could not run here, or it was stopped)
        pass


def wait_for(kind: str, tmp_path_factory) -> tuple[Path, int]:
    """(the study's workdir, its exit code) once the run has finished."""
    start(kind, tmp_path_factory)
    proc, workdir = _RUNNING[kind]
    code = proc.wait()
    _LOGS[kind].close()
    return workdir, code


def stop_all() -> None:
    """End every run still going (SIGTERM: the SLURM runs cancel their jobs as on Ctrl-C), and the SLURM test
    cluster, which the SLURM runs leave up for their tests and whose fixture stops it (this, where that did not)."""
    for proc, _ in _RUNNING.values():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    for log in _LOGS.values():
        log.close()
    if "slurm" in _RUNNING and (_RUNNING["slurm"][1] / "cluster").is_dir():
        subprocess.run([str(CLUSTER_SCRIPT), "stop"], check=False, capture_output=True, timeout=180,
                       env={**os.environ, "RADSTUDY_SLURM_DIR": str(_RUNNING["slurm"][1] / "cluster")})
