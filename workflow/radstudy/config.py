"""Study configuration and centers sheet: loading, defaults and validation against the JSON schemas.

Everything that runs (Snakemake rules and `radstudy` commands) goes through `load_study`, so a
wrong key or row is reported once, before any work, with the key path or row that is wrong.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml

from radstudy.errors import ConfigError

SCHEMA_DIR = Path(__file__).parent / "schemas"


@functools.cache
def _schema(name: str) -> dict:
    return yaml.safe_load((SCHEMA_DIR / f"{name}.schema.yaml").read_text())


def _with_defaults(value: Any, schema: dict) -> Any:
    """Fill `default`s of object properties (recursively), as snakemake.utils.validate(set_default=True) does.
    An absent optional section (an object with no required key and no default of its own) is filled as an empty
    one, so that its keys get their defaults too: every config that validates has every optional key."""
    if not isinstance(value, dict) or schema.get("type") != "object":
        return value
    for key, sub in schema.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        elif key not in value and sub.get("type") == "object" and not sub.get("required"):
            value[key] = {}
        if key in value:
            value[key] = _with_defaults(value[key], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in value:
            if key not in schema.get("properties", {}):
                value[key] = _with_defaults(value[key], extra)
    return value


def _format_error(error: jsonschema.ValidationError, section: str | None = None) -> str:
    path = ".".join(([section] if section else []) + [str(p) for p in error.absolute_path]) or "(top level)"
    if error.validator == "additionalProperties":
        return f"{path}: {error.message} (allowed keys: {', '.join(sorted(error.schema.get('properties', {})))})"
    return f"{path}: {error.message}"


def validate_config(config: dict, source: str = "config") -> dict:
    """Return a validated copy of `config` with schema defaults filled in; raise ConfigError naming every bad key."""
    schema = _schema("config")
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n  ".join(_format_error(e) for e in errors)
        raise ConfigError(f"{source} is invalid:\n  {lines}")
    config = _with_defaults(copy.deepcopy(config), schema)
    _check_deep_features(config, source)
    _check_manual_segmentation(config, source)
    _check_radiomics_params(config, source)
    _check_km_subgroups(config, source)
    key_file = Path(config["pseudonymisation"]["key_file"])
    if "results" in key_file.parts:
        raise ConfigError(
            f"{source}: pseudonymisation.key_file ({key_file}) must lie outside results/: "
            "the key links pseudonyms to patients and results/ is what gets shared"
        )
    return config


def _check_km_subgroups(config: dict, source: str) -> None:
    """evaluation.km_subgroups must name clinical variables (the clinical table has no other column to split by)."""
    variables = list(config["clinical"]["variables"])
    for var in config["evaluation"]["km_subgroups"]:
        if var not in variables:
            raise ConfigError(f"{source}: evaluation.km_subgroups: {var!r} is not one of clinical.variables "
                              f"({', '.join(variables) or 'none'})")


def _check_radiomics_params(config: dict, source: str) -> None:
    """features.radiomics.params per channel must name exactly the image channels."""
    params = config["features"]["radiomics"]["params"]
    if isinstance(params, dict):
        channels = list(config["ingest"]["channels"])
        missing, unknown = sorted(set(channels) - set(params)), sorted(set(params) - set(channels))
        if missing or unknown:
            raise ConfigError(f"{source}: features.radiomics.params per channel must name every image channel "
                              f"({', '.join(channels)}): " + "; ".join(
                                  ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown
                                                                                 else [])))


def _check_manual_segmentation(config: dict, source: str) -> None:
    """segmentation.method manual trains no nnU-Net: what needs the study's nnU-Net must get one elsewhere."""
    seg = config["segmentation"]
    if seg["method"] != "manual" or seg["model_folder"]:
        return
    deep = config["features"]["deep"]
    if deep["enabled"] and deep["backbone"] == "nnunet" and not deep["checkpoint"]:
        raise ConfigError(f"{source}: features.deep.backbone nnunet is the encoder of the study's nnU-Net, which "
                          "segmentation.method manual does not train: give features.deep.checkpoint (a trained nnU-Net "
                          "model folder) or segmentation.model_folder, use backbone resnet3d / resnet2d with its "
                          "checkpoint, or set features.deep.enabled: false")
    networks = config.get("networks") or {}
    multitask = networks.get("multitask") or {}
    if networks.get("enabled") and "multitask" in (networks.get("fit") or []) \
            and multitask.get("encoder") == "nnunet":
        raise ConfigError(f"{source}: networks.multitask.encoder nnunet starts from the study's nnU-Net, which "
                          "segmentation.method manual does not train: give segmentation.model_folder or use encoder "
                          "random")


def _check_deep_features(config: dict, source: str) -> None:
    """Combinations of features.deep keys that the schema alone cannot express."""
    deep = config["features"]["deep"]
    if not deep["enabled"]:
        return
    backbone = deep["backbone"]
    if backbone in ("resnet3d", "resnet2d") and not deep["checkpoint"]:
        raise ConfigError(f"{source}: features.deep.checkpoint: required for backbone {backbone} (the weights file "
                          "of the backbone; only backbone nnunet needs none)")
    if backbone == "resnet2d" and deep["depth"] not in (None, 18, 34, 50):
        raise ConfigError(f"{source}: features.deep.depth: resnet2d (torchvision ResNet) supports 18, 34 or 50, "
                          f"not {deep['depth']}")
    if backbone == "nnunet" and (deep["depth"] is not None or deep["shortcut"] is not None):
        raise ConfigError(f"{source}: features.deep.depth / features.deep.shortcut: only for resnet3d / resnet2d; "
                          "backbone nnunet takes its architecture from the model's plans.json")
    if backbone == "resnet2d" and deep["shortcut"] is not None:
        raise ConfigError(f"{source}: features.deep.shortcut: only for resnet3d (MedicalNet)")
    if deep["window"][0] >= deep["window"][1]:
        raise ConfigError(f"{source}: features.deep.window: the lower bound must be below the upper one, "
                          f"got {deep['window']}")
    labels = config["ingest"].get("labels") or {}
    if deep["region"] not in labels:
        raise ConfigError(f"{source}: features.deep.region: {deep['region']!r} is not a label of ingest.labels "
                          f"({', '.join(labels) or 'none'})")


def section_schema(section: str) -> dict:
    """The schema of one part of the config: a dotted path of keys, `*` for any key of a map
    (e.g. "design", "selection.lasso", "ingest.channels.*")."""
    schema = _schema("config")
    for key in section.split("."):
        schema = schema["additionalProperties"] if key == "*" else schema["properties"][key]
    return schema


def settings(section: str, value: dict | None = None) -> dict:
    """One part of the config (see `section_schema`) validated against the schema, with the schema's defaults
    filled in: the one source of defaults and allowed values for code that is given a part of a config (a
    library call, a unit test). A part of a validated config comes back unchanged. ConfigError names every bad key.
    """
    schema = section_schema(section)
    value = {} if value is None else value
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n  ".join(_format_error(e, section) for e in errors)
        raise ConfigError(f"{section} is invalid:\n  {lines}")
    return _with_defaults(copy.deepcopy(value), schema)


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return validate_config(raw or {}, source=str(path))


@dataclass(frozen=True)
class Center:
    id: str
    role: str  # development | external
    dicom_root: Path
    clinical: Path


def load_centers(path: str | Path, base_dir: str | Path = ".") -> list[Center]:
    """Read and validate the centers sheet; relative paths resolve against `base_dir`."""
    sheet_path = _resolve(Path(base_dir), str(path))
    if not sheet_path.is_file():
        raise ConfigError(f"centers sheet {sheet_path} not found")
    sheet = pd.read_csv(sheet_path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    sheet.columns = [c.strip() for c in sheet.columns]
    validator = jsonschema.Draft202012Validator(_schema("centers"))
    problems = []
    for line, row in enumerate(sheet.to_dict("records"), start=2):  # line 1 is the header
        row = {k: v.strip() for k, v in row.items()}
        for error in validator.iter_errors(row):
            where = ".".join(str(p) for p in error.absolute_path) or "row"
            problems.append(f"{path} line {line} (center {row.get('id', '?')!r}): {where}: {error.message}")
    if problems:
        raise ConfigError("centers sheet is invalid:\n  " + "\n  ".join(problems))
    if sheet.empty:
        raise ConfigError(f"{path}: no centers listed")
    duplicated = sorted(set(sheet["id"][sheet["id"].duplicated()]))
    if duplicated:
        raise ConfigError(f"{path}: center ids must be unique; repeated: {', '.join(duplicated)}")
    if "development" not in set(sheet["role"]):
        raise ConfigError(f"{path}: at least one center must have role 'development' (models are fitted on them)")
    base = Path(base_dir)
    return [
        Center(
            id=r["id"].strip(),
            role=r["role"].strip(),
            dicom_root=_resolve(base, r["dicom_root"].strip()),
            clinical=_resolve(base, r["clinical"].strip()),
        )
        for r in sheet.to_dict("records")
    ]


def _resolve(base: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else base / p


@dataclass(frozen=True)
class Study:
    config: dict
    centers: tuple[Center, ...]
    base_dir: Path = Path(".")  # relative paths in the config resolve against it (Snakemake's working directory)

    def center(self, center_id: str) -> Center:
        for c in self.centers:
            if c.id == center_id:
                return c
        raise ConfigError(f"unknown center {center_id!r} (centers: {', '.join(c.id for c in self.centers)})")

    @property
    def seed(self) -> int:
        return int(self.config["study"]["seed"])

    @property
    def key_file(self) -> Path:
        """The pseudonymisation key (outside results/)."""
        return _resolve(self.base_dir, self.config["pseudonymisation"]["key_file"])


def load_study(config: dict | str | Path, base_dir: str | Path = ".") -> Study:
    """Validated config plus centers sheet. `config` is a path or an already loaded dict (Snakemake's `config`)."""
    cfg = load_config(config) if isinstance(config, (str, Path)) else validate_config(config)
    return Study(config=cfg, centers=tuple(load_centers(cfg["centers"], base_dir)), base_dir=Path(base_dir))
