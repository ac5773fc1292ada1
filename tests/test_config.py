"""The config and the centers sheet are validated before anything runs, naming the offending key or row."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from radstudy.config import load_centers, load_config, load_study, validate_config
from radstudy.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults():
    config = load_config(REPO / "config" / "config.yaml")
    assert config["ingest"]["on_error"] == "exclude"
    assert config["ingest"]["channels"]["CT"]["choose"] == "most_slices"


def test_defaults_are_filled_for_omitted_keys():
    raw = copy.deepcopy(DEFAULT)
    del raw["ingest"]["geometry"]
    raw["ingest"]["channels"]["CT"] = {"description": "portal"}
    config = validate_config(raw)
    assert config["ingest"]["channels"]["CT"]["min_slices"] == 10
    assert config["ingest"]["channels"]["CT"]["exclude_image_type"] == ["LOCALIZER"]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["ingest"].update(on_error="ignore"), "ingest.on_error"),
        (lambda c: c["ingest"]["channels"]["CT"].update(choose="biggest"), "ingest.channels.CT.choose"),
        (lambda c: c["study"].update(seed="abc"), "study.seed"),
        (lambda c: c["ingest"]["labels"].update(liver=0), "ingest.labels.liver"),
        (lambda c: c["ingest"].update(chanels={}), "chanels"),
        (lambda c: c.pop("clinical"), "clinical"),
    ],
)
def test_invalid_config_names_the_key(mutate, expected):
    raw = copy.deepcopy(DEFAULT)
    mutate(raw)
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        validate_config(raw)


def test_key_file_inside_results_is_refused():
    raw = copy.deepcopy(DEFAULT)
    raw["pseudonymisation"]["key_file"] = "results/key.tsv"
    with pytest.raises(ConfigError, match="outside results"):
        validate_config(raw)


def _sheet(tmp_path, text):
    path = tmp_path / "centers.tsv"
    path.write_text(text)
    return path


def test_centers_sheet_row_errors_name_line_and_center(tmp_path):
    path = _sheet(tmp_path, "id\trole\tdicom_root\tclinical\nA1\tdevelopment\td/A1\tc/A1.csv\nB2\ttest\td/B2\tc/B2.csv\n")
    with pytest.raises(ConfigError, match=r"line 3 \(center 'B2'\): role"):
        load_centers(path)


def test_centers_sheet_needs_unique_ids_and_a_development_center(tmp_path):
    dup = _sheet(tmp_path, "id\trole\tdicom_root\tclinical\nA\tdevelopment\td\tc\nA\texternal\td\tc\n")
    with pytest.raises(ConfigError, match="unique.*A"):
        load_centers(dup)
    ext = _sheet(tmp_path, "id\trole\tdicom_root\tclinical\nA\texternal\td\tc\n")
    with pytest.raises(ConfigError, match="development"):
        load_centers(ext)


def test_centers_sheet_missing_column(tmp_path):
    path = _sheet(tmp_path, "id\trole\tdicom_root\nA\tdevelopment\td\n")
    with pytest.raises(ConfigError, match="clinical"):
        load_centers(path)


def test_study_resolves_center_paths_against_base_dir(tmp_path):
    _sheet(tmp_path, "id\trole\tdicom_root\tclinical\nA\tdevelopment\tdata/A\tclin/A.csv\n")
    raw = copy.deepcopy(DEFAULT)
    raw["centers"] = "centers.tsv"
    study = load_study(raw, base_dir=tmp_path)
    assert study.center("A").dicom_root == tmp_path / "data" / "A"
    with pytest.raises(ConfigError, match="unknown center 'Z'"):
        study.center("Z")


# the required keys only: everything else comes from the schema's defaults
MINIMAL = {
    "study": {"name": "minimal", "seed": 3},
    "centers": "config/centers.tsv",
    "pseudonymisation": {"key_file": "secrets/key.tsv"},
    "ingest": {"channels": {"CT": {}}, "labels": {"liver": 1, "tumour": 2}},
    "clinical": {"id_column": "id", "variables": ["age"],
                 "endpoints": {"binary": {"column": "y"}, "survival": {"time": "t", "event": "e"}}},
}


def test_the_schema_holds_the_only_defaults_and_every_stage_accepts_them():
    """The schema's defaults make a complete config: the stages' settings take its sections unchanged (no
    default of their own), a section validated alone gets the same defaults, and every stage accepts them."""
    import numpy as np
    import pandas as pd

    from radstudy.config import settings
    from radstudy.ingest.dicomio import validate_selector
    from radstudy.statistics.design import assign_cohorts
    from radstudy.statistics.models import statistics_settings
    from radstudy.statistics.selection import build_selector, selection_settings

    config = validate_config(copy.deepcopy(MINIMAL))
    schema = yaml.safe_load((REPO / "workflow" / "radstudy" / "schemas" / "config.schema.yaml").read_text())
    with_defaults = [name for name, sub in schema["properties"].items() if "default" in sub]
    assert {"design", "harmonization", "selection", "models", "evaluation", "features"} <= set(with_defaults)
    for name in with_defaults:
        assert settings(name) == config[name] == settings(name, config[name])
    assert validate_selector({}) == dict(config["ingest"]["channels"]["CT"], description=None)

    stats = statistics_settings(config)
    for name in ("design", "harmonization", "selection"):
        assert stats[name] == config[name]
    models = copy.deepcopy(config["models"])
    models["clinical"]["variables"] = config["clinical"]["variables"]  # null: the clinical variables
    assert stats["models"] == models
    assert selection_settings(config) == selection_settings(config["selection"]) == config["selection"]

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(40, 3)), columns=["a", "b", "c"])
    y = (X["a"] + rng.normal(size=40) > 0).astype(int).to_numpy()
    for endpoint in ("binary", "survival"):
        assert build_selector(config, endpoint).get_params()["lasso__rule"] == config["selection"]["lasso"]["rule"]
    build_selector(config, "binary").fit(X, y)
    patients = pd.DataFrame({"patient": [f"C1-{i:04d}" for i in range(40)], "center": "C1", "role": "development",
                             "y": y})
    cohorts = assign_cohorts(patients, config["design"], config["study"]["seed"], outcome="y")
    assert set(cohorts["cohort"]) == {"training", "validation"}


@pytest.mark.parametrize("section, value, expected", [
    ("design", {"type": "bootstrap"}, "design.type"),
    ("selection", {"lasoo": {}}, "lasoo"),
    ("harmonization", {"external": "all"}, "harmonization.external"),
    ("models", {"fit": ["texture"]}, "models.fit.0"),
    ("ingest.channels.*", {"choose": "largest"}, "ingest.channels.*.choose"),
])
def test_a_part_of_a_config_is_checked_against_the_schema(section, value, expected):
    from radstudy.config import settings

    with pytest.raises(ConfigError, match=re.escape(expected)):
        settings(section, value)


def test_manual_segmentation_refuses_what_needs_the_study_nnunet(tmp_path):
    """segmentation.method manual trains no nnU-Net: the nnunet deep-feature backbone and a multitask network
    starting from nnU-Net need a model given elsewhere, with a message saying so."""
    config = copy.deepcopy(DEFAULT)
    config["segmentation"]["method"] = "manual"
    with pytest.raises(ConfigError, match="features.deep.backbone nnunet.*segmentation.method manual"):
        validate_config(config)
    config["features"]["deep"]["enabled"] = False
    config["networks"].update(enabled=True, fit=["multitask"], multitask={"encoder": "nnunet"})
    with pytest.raises(ConfigError, match="networks.multitask.encoder nnunet"):
        validate_config(config)
    config["segmentation"]["model_folder"] = "given_model"  # a model from elsewhere: allowed
    assert validate_config(config)["segmentation"]["method"] == "manual"


def test_radiomics_parameters_per_channel_name_every_image_channel():
    config = copy.deepcopy(DEFAULT)
    config["features"]["radiomics"]["params"] = {"CT": "config/radiomics/ct.yaml"}
    assert validate_config(config)["features"]["radiomics"]["params"] == {"CT": "config/radiomics/ct.yaml"}
    config["features"]["radiomics"]["params"] = {"CT": "config/radiomics/ct.yaml", "T2": "config/radiomics/mri.yaml"}
    with pytest.raises(ConfigError, match=r"name every image channel \(CT\): unknown \['T2'\]"):
        validate_config(config)
