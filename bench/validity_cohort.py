"""The validity cohort's study folder: the shipped CT demo's config with config/validity/overrides.yaml merged over
it (nested keys merged, lists and values replaced), and the files its relative paths name.

    python bench/validity_cohort.py validity   # then: snakemake --directory validity --configfile validity/config/config.yaml

Writes FOLDER/config/config.yaml and copies the centers sheet and the radiomics parameter file into FOLDER under the
same relative paths (config/centers.tsv, config/radiomics/demo.yaml): FOLDER is laid out as the repository's own
study, so the study runs with FOLDER as Snakemake's working directory and bench/validity_study.py FOLDER reads the
same config. A file already in FOLDER is kept (edit
the copy, as with demo-mri/). `make validity` runs this, the workflow and the validity study (docs/validity.md).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from pathlib import Path

import yaml
from radstudy.config import validate_config

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "config" / "config.yaml"
OVERRIDES = REPO / "config" / "validity" / "overrides.yaml"


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` laid over it: a mapping in both is merged key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validity_config(base: Path = BASE, overrides: Path = OVERRIDES) -> dict:
    """The merged config, validated (radstudy.config.validate_config raises ConfigError naming the key)."""
    config = merged(yaml.safe_load(base.read_text()), yaml.safe_load(overrides.read_text()) or {})
    validate_config(copy.deepcopy(config), source=f"{base.name} + {overrides.name}")
    return config


def write_study(folder: Path, base: Path = BASE, overrides: Path = OVERRIDES) -> Path:
    """FOLDER/config/config.yaml (unless there) and the relative files it names (unless there); returns its path."""
    target = folder / "config" / "config.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        config = validity_config(base, overrides)
        header = f"# written by bench/validity_cohort.py: {base} with {overrides} merged over it\n"
        target.write_text(header + yaml.safe_dump(config, sort_keys=False))
    config = yaml.safe_load(target.read_text())
    for relative in (config["centers"], config["features"]["radiomics"]["params"]):
        source, copy_to = base.parents[1] / relative, folder / relative
        if not copy_to.exists():
            copy_to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy_to)
    return target


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the study folder to write (created if missing)")
    args = parser.parse_args(argv)
    path = write_study(args.folder)
    print(f"{path}: the validity cohort's config")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
