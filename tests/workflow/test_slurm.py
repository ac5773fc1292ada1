"""SLURM: the shared tiny study, whole, through workflow/profiles/slurm on a real single-node SLURM cluster.

tests/slurm/local_cluster.sh installs Debian's munge + slurmctld + slurmd (root, apt-get) and starts a throw-away
cluster (no accounting database); the module skips, with the reason, where that cannot be done. The study's
delivery (the same DICOM folders, clinical tables, broken patients and pseudonym key) runs again on SLURM, given
the nnU-Net model that the shared local run trained (segmentation.model_folder: nnU-Net training is not
bit-reproducible from run to run, and its SLURM sizing is checked by the profile's dry runs below). Proves: every
job of the study ran as a SLURM job with the profile's sizes (discovery, ingestion, prediction, segmentation
quality, radiomics, perturbed-mask radiomics, deep features, statistics, evaluation and report; the end-to-end
networks stay off there) but the table-assembly rules the Snakefile declares `localrules` (clinical tables, QC, the
segmentation split, the feature tables, the patient flow, the report's baseline), which ran in the snakemake
process, and only those; per-patient jobs grouped into one SLURM job per center sized for serial members; results
equal to the shared local run (ingestion, segmentation masks, features, models, predictions); and a job failing on
SLURM (a second run of the same delivery, on the same cluster at the same time, whose center C delivered a file
where its DICOM folder should be) fails the workflow with its log shown. The profiles' resolution of every rule
(GPU requests included) is checked with dry runs, without a cluster.

The two runs are mostly waiting (on SLURM's status polls), so they run in the background
(tests/background_studies.py runs this file as a script, `run_in_background`): the cluster is installed and
started right after collection, and the runs start as soon as the shared local run has finished, while the other
tests that read it run; tests/conftest.py puts this module's cluster tests last, and `slurm_runs` waits for the runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from tiny_study import PATIENTS, RUN_OUTPUT, SNAKEMAKE, write_tiny_study

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "tests" / "slurm" / "local_cluster.sh"
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm"
LOCAL_PROFILE = REPO / "workflow" / "profiles" / "default"
pytestmark = [pytest.mark.slow, pytest.mark.slurm]

CENTERS = ("A", "B", "C")
# every rule of the shared tiny study given its model (demo_cohort ran before, locally: it wrote the hospitals'
# deliveries; nnU-Net's dataset, planning and training are replaced by the given model, their sizes checked by
# the dry runs below): on SLURM, or, the Snakefile's `localrules` (table assembly), in the snakemake process
SLURM_RULES = {"discover", "ingest_patient", "segment_center", "segmentation_quality", "radiomics_patient",
               "radiomics_perturbed", "deep_features_center", "statistics", "evaluate_report"}
LOCAL_RULES = {"clinical_table", "center_qc", "segmentation_split", "perturbed_table", "feature_table",
               "patient_flow", "report_baseline"}
GROUPED = {"ingest_patient": "ingest", "radiomics_patient": "radiomics", "radiomics_perturbed": "perturbed"}
# Overrides a site with slurmdbd would not need: no accounting database here (sacct would poll forever, and the
# plugin's account guess calls sacct), quick first status check, logs of successful jobs kept as evidence; and up
# to 12 SLURM jobs at once: the study's widest stage (every center's radiomics, perturbed radiomics and deep
# features, and the segmentation quality) in one go, not a job of it waiting for a slot and then for a status poll.
TEST_OVERRIDES = ["--slurm-status-command", "squeue", "--slurm-no-account",
                  "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs", "--jobs", "12"]


def _profile() -> dict:
    return yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())


def _node_size() -> tuple[int, int]:
    """(CPUs, MB) of the test cluster's one node: room for the study run's --jobs and the failing run's one job,
    each of the profile's largest request, at once.

    SLURM allocates the profile's sizes as they are, whatever this machine is (the jobs themselves need little,
    and nothing enforces the sizes). A node that holds fewer makes the runs' jobs queue for one another, e.g. a
    center's QC behind two nnU-Net segmentations, time that only this test cluster would add.
    """
    slots = int(TEST_OVERRIDES[TEST_OVERRIDES.index("--jobs") + 1]) + 1
    sizes = _profile()["set-resources"].values()
    return (slots * max(size.get("cpus_per_task", 1) for size in sizes),
            slots * max(size.get("mem_mb", 0) for size in sizes))


NODE_CPUS, NODE_MEM_MB = _node_size()


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C for snakemake: SIGINT cancels its SLURM jobs (SIGTERM may hang); a second one if it lingers."""
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGINT, 20)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _start_snakemake_slurm(workdir: Path, env: dict, *args: str) -> subprocess.Popen:
    """snakemake with the SLURM profile (and TEST_OVERRIDES) in workdir, started; its output (stderr too) goes to
    workdir/RUN_OUTPUT."""
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--workflow-profile", str(SLURM_PROFILE),
           *TEST_OVERRIDES, *args]
    with (workdir / RUN_OUTPUT).open("w") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, text=True,
                                cwd=workdir, env=env)


def _minutes(limit: str) -> int:
    """SLURM time limit ([D-]HH:MM:SS, MM:SS) in minutes."""
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 1440 + parts[0] * 60 + parts[1] + (parts[2] > 0)


def _mb(memory: str) -> float:
    """squeue's memory (%m: 8000M, 62.50G) in MB."""
    return float(memory[:-1]) * {"M": 1, "G": 1024, "T": 1024**2}[memory[-1]]


def _slurm_jobs(env: dict, run_ids: list[str]) -> pd.DataFrame:
    """Every job of the snakemake runs (their jobs are named by the run's id), finished ones included; `rule`
    is the job's rule, or the grouped rule of a group job."""
    out = subprocess.run(["squeue", "--states=all", "--noheader", "--name", ",".join(run_ids),
                          "-o", "%i|%T|%k|%C|%m|%l"], capture_output=True, text=True, env=env, check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    jobs = pd.DataFrame(rows, columns=["job", "state", "comment", "cpus", "memory", "limit"])
    group = jobs["comment"].str.extract(r"^rule_(?:ingest|radiomics|perturbed)_[A-Z]+_(\w+)$")[0]
    jobs["rule"] = group.fillna(jobs["comment"].str.extract(r"^rule_(\w+?)(?:_wildcards_.*)?$")[0])
    jobs["group"] = group.notna()
    jobs["center"] = jobs["comment"].str.extract(r"(?:_wildcards_|^rule_[a-z]+_)([A-Z]+)(?:_|$)")[0]
    return jobs


def _run_ids(output: str) -> list[str]:
    ids = re.findall(r"SLURM run ID: (\S+)", output)
    assert ids, output[-3000:]
    return ids


def _cannot_run_here() -> str | None:
    if os.geteuid() != 0:
        return "the test cluster's slurmd needs root"
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        return "no apt-get to install SLURM, and SLURM is not installed"
    return None


def _start_cluster(state: Path) -> tuple[dict, str | None]:
    """Install SLURM where needed and start the test cluster, its files under `state`: (the variables its clients
    need, None), or (those known so far, why it could not be started)."""
    # RADSTUDY_SLURM_OWNER, the pytest process: a later start may replace this cluster once it is gone (a killed run)
    env = {"RADSTUDY_SLURM_DIR": str(state), "RADSTUDY_SLURM_CPUS": str(NODE_CPUS),
           "RADSTUDY_SLURM_MEM_MB": str(NODE_MEM_MB), "RADSTUDY_SLURM_OWNER": str(os.getppid())}
    install = subprocess.run([str(CLUSTER_SCRIPT), "install"], check=False, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, env={**os.environ, **env}, timeout=900)
    if install.returncode != 0:
        return env, f"SLURM could not be installed: {install.stderr.strip()[-500:]}"
    start = subprocess.run([str(CLUSTER_SCRIPT), "start"], check=False, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, env={**os.environ, **env}, timeout=180)
    if start.returncode != 0:
        return env, f"the SLURM test cluster did not start: {start.stderr.strip()[-800:]}"
    return {**env, "SLURM_CONF": start.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")}, None


def _stop_cluster(env: dict) -> None:
    if Path(env.get("RADSTUDY_SLURM_DIR", "")).is_dir():
        subprocess.run([str(CLUSTER_SCRIPT), "stop"], check=False, capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=180)


def _delivery(local: Path, to: Path) -> Path:
    """The shared study's delivery (the same DICOM folders, clinical tables and pseudonym key) in a new working
    directory, configured to run on SLURM with the shared local run's nnU-Net model."""
    to.mkdir(parents=True, exist_ok=True)
    for item in ("config.yaml", "centers.tsv", "radiomics.yaml"):
        shutil.copy2(local / item, to / item)
    shutil.copytree(local / "demo", to / "demo")
    shutil.copytree(local / "resources" / "private", to / "resources" / "private")  # the same pseudonyms
    model = next((local / "resources" / "nnunet" / "results").rglob("plans.json")).parent
    shutil.copytree(model, to / "given_model")
    config = yaml.safe_load((to / "config.yaml").read_text())
    config["segmentation"]["model_folder"] = "given_model"
    config["demo"]["enabled"] = False  # delivered: the demo's folders are the hospitals' data now
    # The networks stay local: a CPU-bound stage like statistics, whose profile entry and GPU request the dry runs
    # below check; leaving them out keeps this test within the suite's time (their determinism: tests/networks).
    config["networks"]["enabled"] = False
    (to / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return to


RESULT = "slurm_runs.json"


def _slurm_runs(local: Path, workdir: Path, env: dict) -> dict[str, int]:
    """The module's two SLURM runs, started together on the one cluster: the whole study (workdir/on_slurm), and the
    discovery of a center whose DICOM folder is a file (workdir/failing_on_slurm); their exit codes. The second is
    one short job, most of its time spent waiting on the plugin's status polls (and, once its job failed, on the poll
    interval before snakemake exits): run on its own after the study it would add that wait to the runs' time."""
    on_slurm = _delivery(local, workdir / "on_slurm")
    # The failing run: the same delivery, but center C's dicom_root is a file (say, an archive where the unpacked
    # folder should be): snakemake sees its input and submits C's discovery, the one job to run, which fails on SLURM.
    failing = _delivery(local, workdir / "failing_on_slurm")
    shutil.rmtree(failing / "demo" / "dicom" / "C")
    (failing / "demo" / "dicom" / "C").write_text("an archive, not the center's patient folders\n")
    procs = [_start_snakemake_slurm(on_slurm, env),
             _start_snakemake_slurm(failing, env, "results/ingest/C/patients.tsv")]
    try:
        procs[0].wait(timeout=1500)
        procs[1].wait(timeout=300)
    except BaseException:  # timeout, or stopped: leave no snakemake (nor its SLURM jobs) behind
        for proc in procs:
            _stop(proc)
        raise
    return {"study": procs[0].returncode, "failing": procs[1].returncode}


def run_in_background(workdir: Path, local: Path) -> int:
    """The module's SLURM runs, in a background process of the suite (tests/background_studies.py): start the test
    cluster, wait for the shared tiny study in `local` (its exit code comes on stdin once it has finished), then run
    both on SLURM (`_slurm_runs`). The cluster stays up for the tests' squeue; `slurm_runs` stops it. workdir/RESULT:
    why the runs cannot be done here ("skip"), or what failed ("error"), or the runs' exit codes; and the cluster's
    variables ("env")."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stopped (the session ends): Ctrl-C the runs (_stop)
    env, reason = {}, _cannot_run_here()
    if not reason:
        env, reason = _start_cluster(workdir / "cluster")
    if reason:
        (workdir / RESULT).write_text(json.dumps({"skip": reason, "env": env}))
        return 0
    result = {"env": env}
    code = sys.stdin.readline().strip()  # the study's exit code: what this starts reads no stdin, so none takes it
    try:
        if code != "0":
            result["error"] = f"the shared tiny study did not finish well (exit code {code or 'unknown'})"
        else:
            result.update(_slurm_runs(local, workdir, {**os.environ, **env}))
    except Exception:  # noqa: BLE001 (whatever it is, the fixture shows it)
        result["error"] = traceback.format_exc()
    finally:
        if "study" not in result:
            _stop_cluster(env)
        (workdir / RESULT).write_text(json.dumps(result))
    return 0


@pytest.fixture(scope="module")
def slurm_runs(tmp_path_factory, request):
    """The module's two SLURM runs (`_slurm_runs`), done in the background: waits for them, skips (with the reason)
    where no test cluster can be started here, and stops the cluster after the module's tests.

    {"env": the cluster's client environment, "study": (workdir, its local counterpart, output),
     "failing": (workdir, exit code, output)}
    """
    from background_studies import wait_for

    workdir, code = wait_for("slurm", tmp_path_factory)
    assert (workdir / RESULT).exists(), f"the background SLURM runs ended ({code}) without a result: see their log"
    result = json.loads((workdir / RESULT).read_text())
    env = {**os.environ, **result["env"]}
    try:
        if "skip" in result:
            pytest.skip(result["skip"])
        local = request.getfixturevalue("tiny_study").workdir  # fails with the shared run's output if that failed
        assert "error" not in result, result["error"]
        on_slurm, failing = workdir / "on_slurm", workdir / "failing_on_slurm"
        output = (on_slurm / RUN_OUTPUT).read_text()
        assert result["study"] == 0, output[-6000:]
        yield {"env": env, "study": (on_slurm, local, output),
               "failing": (failing, result["failing"], (failing / RUN_OUTPUT).read_text())}
    finally:
        _stop_cluster(result["env"])


@pytest.fixture(scope="module")
def cluster(slurm_runs) -> dict:
    """The environment of the test cluster's clients (SLURM_CONF), for squeue."""
    return slurm_runs["env"]


@pytest.fixture(scope="module")
def runs(slurm_runs):
    """The shared study's delivery run on SLURM with the shared run's model: (slurm workdir, local workdir, output)."""
    return slurm_runs["study"]


def test_every_job_ran_as_a_slurm_job_sized_by_the_profile(cluster, runs):
    on_slurm, _, output = runs
    jobs = _slurm_jobs(cluster, _run_ids(output))
    assert len(jobs) and set(jobs["state"]) == {"COMPLETED"}, jobs
    assert set(jobs["rule"]) == SLURM_RULES, jobs
    # the run's own job list: what ran outside SLURM is the local table assembly, and the target rule (no job)
    local_jobs = set(re.findall(r"^localrule (\w+):$", output, flags=re.M))
    assert local_jobs == LOCAL_RULES | {"all"}, local_jobs
    local_logs = [f"{kind}/{c}.log" for kind in ("clinical", "qc") for c in CENTERS] + [
        "segmentation/split.log", "features/perturbed.log", "features/table.log", "patient_flow.log",
        "report_baseline.log"]
    for log in local_logs:  # written in the snakemake process, in no SLURM job
        assert "SLURM job" not in (on_slurm / "results" / "logs" / log).read_text(), log
    profile = _profile()["set-resources"]
    for row in jobs.itertuples():
        sizes = profile[row.rule]
        assert _mb(row.memory) == sizes["mem_mb"], row
        assert row.cpus == str(sizes.get("cpus_per_task", 1)), row
        if not row.group:
            assert _minutes(row.limit) == sizes["runtime"], row
    # the rule's own log names the SLURM job it ran in (radstudy.logs.setup)
    rule_logs = {"discover": "discover/{c}.log", "segment_center": "segmentation/{c}.log",
                 "segmentation_quality": "segmentation/quality.log", "statistics": "statistics.log",
                 "evaluate_report": "report.log"}
    assert set(rule_logs) <= SLURM_RULES
    for row in jobs[jobs["rule"].isin(rule_logs)].itertuples():
        log = on_slurm / "results" / "logs" / rule_logs[row.rule].format(c=row.center)
        assert f"SLURM job {row.job} on " in log.read_text(), (log, row)
    for row in jobs[jobs["rule"] == "ingest_patient"].itertuples():
        patient_logs = list((on_slurm / "results" / "logs" / "ingest" / row.center).glob("*.log"))
        assert len(patient_logs) == len(_delivered(on_slurm, row.center))
        assert all(f"SLURM job {row.job} on " in log.read_text() for log in patient_logs), row
    # each SLURM job's log, named by its job id, where the plugin puts it
    for row in jobs.itertuples():
        logs = list((on_slurm / ".snakemake" / "slurm_logs").rglob(f"{row.job}.log"))
        assert len(logs) == 1, row
        text = logs[0].read_text()
        assert f"(Rule: {row.rule})" in text and "(100%) done" in text, logs[0]


def test_patients_are_grouped_into_one_slurm_job_per_center_sized_for_serial_members(cluster, runs):
    on_slurm, _, output = runs
    jobs = _slurm_jobs(cluster, _run_ids(output))
    profile = _profile()["set-resources"]
    for rule, group in GROUPED.items():
        rows = jobs[jobs["rule"] == rule]
        assert rows["group"].all(), rows  # no job of a grouped rule ran on its own
        assert sorted(rows["comment"]) == [f"rule_{group}_{c}_{rule}" for c in CENTERS], jobs
        # members run one after the other (the plugin's jobstep runs with --jobs 1): one member's CPU and memory,
        # the sum of their runtimes
        assert (rows["cpus"] == "1").all() and rows["memory"].map(_mb).eq(profile[rule]["mem_mb"]).all(), rows
        for row in rows.itertuples():
            members = len({"ingest_patient": _delivered(on_slurm, row.center),
                           "radiomics_patient": list((on_slurm / "results/features" / row.center).glob("*.parquet")),
                           "radiomics_perturbed": list((on_slurm / "results/features/perturbed" / row.center)
                                                       .glob("*.parquet"))}[rule])
            assert _minutes(row.limit) == members * profile[rule]["runtime"], (row, members)


def _delivered(workdir: Path, center: str) -> list[str]:
    return pd.read_csv(workdir / "results" / "ingest" / center / "patients.tsv", sep="\t")["patient"].tolist()


def _nifti(path: Path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    return value


# What differs by design between the local run (trained its model) and the SLURM run (given that model):
# the segmentation holdout (with a given model every annotated patient is a holdout patient), hence the DSC table
# and the report's text; the deep features' metadata names the model's path; the networks run in the local study only.
DIFFERS_BY_DESIGN = {"results/segmentation/split.tsv", "results/segmentation/dsc.tsv"}


def _differs_by_design(path: Path) -> bool:
    return (str(path) in DIFFERS_BY_DESIGN or path.parts[:2] in (("results", "report"), ("results", "networks"))
            or path.name.endswith(".meta.json"))


def test_results_equal_a_local_run(runs):
    on_slurm, local, _ = runs
    tables = sorted(p.relative_to(local) for p in (local / "results").rglob("*") if p.suffix in (".tsv", ".json")
                    and "logs" not in p.parts and "benchmarks" not in p.parts and p.name != "qc.json")
    tables = [t for t in tables if not _differs_by_design(t)]
    for kind in ("ingest", "qc", "clinical", "segmentation", "features", "models"):
        assert any(t.parts[1] == kind for t in tables), (kind, tables)
    for table in tables:
        if table == Path("results/models/predictions.tsv"):  # the same, but for the networks' rows (local only)
            mine, theirs = (pd.read_csv(root / table, sep="\t") for root in (on_slurm, local))
            networks = yaml.safe_load((local / "config.yaml").read_text())["networks"]["fit"]
            theirs = theirs[~theirs["model"].isin(networks)].reset_index(drop=True)
            pd.testing.assert_frame_equal(mine, theirs)
            continue
        assert (on_slurm / table).read_bytes() == (local / table).read_bytes(), table
    table = "results/features/features.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(on_slurm / table), pd.read_parquet(local / table))
    qc = pd.concat([pd.read_csv(local / f"results/qc/{c}/patients.tsv", sep="\t") for c in CENTERS])
    assert (qc["status"] == "included").sum() == len(CENTERS) * PATIENTS
    images = sorted(p.relative_to(local) for folder in ("ingest", "segmentation")
                    for p in (local / "results" / folder).rglob("*.nii.gz"))
    assert len(images) >= 2 * len(CENTERS) * PATIENTS  # CTs, masks, and every patient's segmentation
    for image in images:
        mine, theirs = _nifti(on_slurm / image), _nifti(local / image)
        assert (mine[0] == theirs[0]).all() and mine[1:] == theirs[1:], image
    for qc_json in (local / "results" / "ingest").rglob("qc.json"):
        other = on_slurm / qc_json.relative_to(local)
        assert _without_timings(json.loads(other.read_text())) == _without_timings(json.loads(qc_json.read_text()))
    assert (on_slurm / "results" / "report" / "report.html").stat().st_size > 0


def test_a_job_failing_on_slurm_fails_the_workflow_with_its_log_shown(cluster, slurm_runs):
    workdir, code, output = slurm_runs["failing"]
    assert code != 0, output[-3000:]
    assert "Error in rule discover" in output, output[-3000:]
    failed = _slurm_jobs(cluster, _run_ids(output))
    assert list(failed["state"]) == ["FAILED"] and list(failed["rule"]) == ["discover"], failed
    job = failed["job"].iloc[0]
    log = workdir / ".snakemake" / "slurm_logs" / "rule_discover" / "C" / f"{job}.log"
    assert str(log) in output
    # the job's traceback, in the rule's log and the SLURM log, both printed (show-failed-logs in the profile)
    rule_log = (workdir / "results" / "logs" / "discover" / "C.log").read_text()
    assert f"SLURM job {job} on " in rule_log and "Traceback" in rule_log, rule_log
    error = [line for line in rule_log.splitlines() if re.match(r"^[\w.]+(Error|Exception): ", line)]
    assert error and "is not a folder" in error[-1] and error[-1] in log.read_text(), rule_log
    assert "Logfile results/logs/discover/C.log:" in output and f"Logfile {log}:" in output, output[-3000:]
    assert output.count(error[-1]) >= 2, output[-3000:]


# ---------------------------------------------------------------- the profiles, resolved by dry runs (no cluster)

def _dry_run(tmp_path: Path, profile: Path, gpu: bool) -> str:
    write_tiny_study(tmp_path)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["segmentation"]["gpu"] = gpu
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run = subprocess.run(
        [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
         str(tmp_path / "config.yaml"), "--workflow-profile", str(profile), "--dry-run", "--cores", "2"],
        capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


def _job_resources(output: str, rule: str) -> dict[str, str]:
    match = re.search(rf"^(?:rule|checkpoint) {rule}:\n(?:    .*\n)*?    resources: (.*)$", output, re.MULTILINE)
    assert match, f"no {rule} job in the dry run"
    return dict(item.split("=", 1) for item in match.group(1).split(", "))


@pytest.mark.parametrize("gpu", [True, False])
def test_slurm_profile_sizes_every_rule_and_asks_a_gpu_for_nnunet(tmp_path, gpu):
    output = _dry_run(tmp_path, SLURM_PROFILE, gpu)
    assert "Using workflow specific profile" in output
    profile = _profile()["set-resources"]
    for rule in ("demo_cohort", "discover", "nnunet_dataset", "nnunet_plan", "nnunet_train", "segment_center"):
        resources = _job_resources(output, rule)
        for key, value in profile[rule].items():
            assert resources.get(key) == str(value), (rule, key, resources)
    for rule in ("nnunet_train", "segment_center"):
        # the plugin turns gpu=N into sbatch --gpus=N
        assert (_job_resources(output, rule).get("gpu") == "1") == gpu, rule


def test_slurm_profile_sizes_every_rule_but_the_local_ones(tmp_path):
    """Every rule the workflow has (whatever the config) that is not a local rule has its own SLURM sizes."""
    write_tiny_study(tmp_path)
    run = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                          str(tmp_path / "config.yaml"), "--list-rules"], capture_output=True, text=True, cwd=tmp_path,
                         check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rules = set(re.findall(r"^(\w+)$", run.stdout, flags=re.MULTILINE))
    assert LOCAL_RULES < rules and SLURM_RULES < rules, rules
    assert set(_profile()["set-resources"]) == rules - LOCAL_RULES - {"all"}


def test_local_profile_is_picked_up_by_name(tmp_path):
    output = _dry_run(tmp_path, LOCAL_PROFILE, gpu=False)
    profile = yaml.safe_load((LOCAL_PROFILE / "config.yaml").read_text())
    assert _job_resources(output, "nnunet_plan")["mem_mb"] == str(profile["set-resources"]["nnunet_plan"]["mem_mb"])
    assert _job_resources(output, "discover")["mem_mb"] == str(profile["default-resources"]["mem_mb"])


if __name__ == "__main__":  # tests/background_studies.py: test_slurm.py slurm WORKDIR CT_WORKDIR
    sys.exit(run_in_background(Path(sys.argv[2]), Path(sys.argv[3])))
