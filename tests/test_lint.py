"""The workflow as the linter sees it, for every config variant that changes which rules exist or what they read.

Every rule is defined whatever the config, except `demo_cohort`, which exists only with demo.enabled (its
outputs are the hospitals' delivery folders: without the demo, Snakemake must never "make" missing hospital
data). So `snakemake --lint` on one config cannot see every rule, nor every input function in use. The
variants below switch the four options that change the rules (demo, features.robustness, features.deep,
segmentation.model_folder) so that every option is linted on and off, and every pair of options in all four
combinations (a pairwise covering array: 5 lint runs instead of 16, about 2 s each).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OPTIONS = ("demo", "robustness", "deep", "model_folder")
# rows: demo, robustness, deep, model_folder (every pair of options takes all four on/off combinations)
VARIANTS = [(0, 0, 0, 0), (0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0)]
ALWAYS = {"all", "discover", "ingest_patient", "clinical_table", "center_qc", "patient_flow", "segmentation_split",
          "nnunet_dataset", "nnunet_plan", "nnunet_train", "segment_center", "segmentation_quality",
          "radiomics_patient", "radiomics_perturbed", "perturbed_table", "deep_features_center", "feature_table",
          "statistics", "report_baseline", "evaluate_report", "network_inputs", "networks"}


def _config(tmp_path: Path, demo: int, robustness: int, deep: int, model_folder: int) -> Path:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["demo"]["enabled"] = bool(demo)
    config["features"]["robustness"] = {"enabled": bool(robustness)}
    config["features"]["deep"]["enabled"] = bool(deep)
    config["segmentation"]["model_folder"] = "resources/given_model" if model_folder else None
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _snakemake(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--configfile", str(config), *args],
                          capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{o}={'on' if x else 'off'}"
                                                                     for o, x in zip(OPTIONS, v)))
def test_lint_is_clean_in_every_config_variant(variant, tmp_path):
    run = _snakemake(_config(tmp_path, *variant), "--lint")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Congratulations" in run.stdout + run.stderr, run.stdout + run.stderr


@pytest.mark.parametrize("demo", [0, 1])
def test_every_rule_is_defined_whatever_the_config_but_the_demo(demo, tmp_path):
    """The rules the linter sees: all of them in any config; demo_cohort only with the demo."""
    on = 1 - demo  # the other options opposite to the demo: both states of each are listed across the two runs
    run = _snakemake(_config(tmp_path, demo, on, on, on), "--list-rules")
    assert run.returncode == 0, run.stdout + run.stderr
    rules = set(re.findall(r"^(\w+)$", run.stdout, flags=re.M))
    assert rules == ALWAYS | ({"demo_cohort"} if demo else set()), rules


def test_rules_are_formatted():
    run = subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"], capture_output=True,
                         text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
