"""Any config that validates, runs: the smallest config the schema allows, and the study's config with each
optional section removed in turn, ingest a patient and plan the whole workflow (a dry run on the shared tiny
study) without a KeyError. Every optional key takes its default from the schema (radstudy.config)."""

from __future__ import annotations

import copy
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from radstudy.config import _schema, load_study
from radstudy.ingest.patient import ingest_patient

from tiny_study import REPO, SNAKEMAKE

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _minimal(config: dict) -> dict:
    """Only what the schema requires: the required sections and, in them, the required keys."""
    return {
        "study": config["study"],
        "centers": config["centers"],
        "pseudonymisation": config["pseudonymisation"],
        "ingest": {"channels": {"CT": {"description": config["ingest"]["channels"]["CT"]["description"]}},
                   "labels": config["ingest"]["labels"]},
        "clinical": config["clinical"],
    }


def _optional_sections(schema: dict, config: dict, prefix: str = "", depth: int = 2):
    """Dotted paths of the config's sections (objects) that the schema does not require: the top-level ones and
    those of the required sections (ingest.masks, clinical.endpoints.survival...), `depth` levels down. Deeper
    sections get their defaults by the same code (radstudy.config._with_defaults), tested in tests/test_config.py."""
    for key, sub in schema.get("properties", {}).items():
        if key not in config or not isinstance(config[key], dict):
            continue
        required = key in schema.get("required", [])
        if not required:
            yield prefix + key
        elif depth > 0 and sub.get("type") == "object" and "properties" in sub:
            yield from _optional_sections(sub, config[key], prefix + key + ".", depth - 1)


def _without(config: dict, path: str) -> dict:
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    del node[last]
    return config


def _variants(config: dict) -> dict[str, dict]:
    variants = {"minimal": _minimal(config)}
    for path in _optional_sections(_schema("config"), config):
        variants[f"without {path}"] = _without(config, path)
    return variants


def test_the_variants_cover_every_optional_section(tiny_study):
    config = yaml.safe_load((tiny_study.workdir / "config.yaml").read_text())
    names = set(_variants(config))
    assert {"without segmentation", "without ingest.masks", "without ingest.geometry", "without features",
            "without evaluation", "without demo"} <= names


def test_every_valid_config_ingests_and_plans_the_workflow(tiny_study, tmp_path):
    workdir = tiny_study.workdir
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    patients = (workdir / "results" / "ingest" / "A" / "patients.tsv").read_text().splitlines()[1:]
    patient = next(line.split("\t")[0] for line in patients)  # the first delivered patient of center A
    failures, paths = [], {}
    for name, variant in _variants(config).items():
        path = paths[name] = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(variant, sort_keys=False))
        study = load_study(path, base_dir=workdir)
        record = ingest_patient(study, "A", patient, tmp_path / name.replace(" ", "_"))
        if record["status"] != "included":
            failures.append(f"{name}: ingestion: {record.get('message')}")

    def dry_run(name: str) -> str | None:
        dry = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
                              str(paths[name]), "--cores", "1", "--dry-run", "--nolock", "--quiet", "rules"],
                             capture_output=True, text=True, cwd=workdir)
        if dry.returncode != 0 or "KeyError" in dry.stderr:
            return f"{name}: dry run: {dry.stderr[-800:]}"
        return None

    with ThreadPoolExecutor(2) as pool:  # each dry run is one Snakemake process
        failures += [f for f in pool.map(dry_run, paths) if f]
    assert not failures, "\n".join(failures)
