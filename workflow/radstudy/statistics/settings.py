"""The statistics stage's settings, read from a study config without the stage's libraries (scikit-learn, scipy):
the Snakefile reads them at every start (each SLURM job starts Snakemake twice), so they import the config only.
`radstudy.statistics.models` re-exports them."""

from __future__ import annotations

from radstudy.config import section_schema, settings

ENDPOINTS = tuple(section_schema("clinical.endpoints")["properties"])  # binary, survival


def endpoint_spec(config: dict) -> dict[str, dict]:
    """{'binary': {'column': ...}, 'survival': {'time': ..., 'event': ...}} as configured."""
    endpoints = config.get("clinical", {}).get("endpoints", {})
    out = {k: dict(v) for k, v in endpoints.items() if k in ENDPOINTS}
    if not out:
        raise ValueError("clinical.endpoints configures neither a binary nor a survival endpoint")
    return out


def outcome_columns(config: dict) -> list[str]:
    return [c for spec in endpoint_spec(config).values() for c in spec.values()]


def statistics_settings(config: dict) -> dict:
    """design / harmonization / selection / models sections validated, with the schema's defaults (ConfigError).

    Refuses ComBat covariates that are outcome columns: harmonising with the outcome builds the training
    features from the labels (label leakage)."""
    out = {
        "design": settings("design", config.get("design")),
        "harmonization": settings("harmonization", config.get("harmonization")),
        "selection": settings("selection", config.get("selection")),
        "models": settings("models", config.get("models")),
        "endpoints": endpoint_spec(config),
        "seed": int(config.get("study", {}).get("seed", 0)),
    }
    h, m = out["harmonization"], out["models"]
    check_covariates(h["covariates"], outcome_columns(config))
    if m["clinical"]["variables"] is None:
        m["clinical"]["variables"] = list(config.get("clinical", {}).get("variables", []))
    leaked = set(m["clinical"]["variables"]) & set(outcome_columns(config))
    if leaked:
        raise ValueError(f"models.clinical.variables include outcome column(s) {sorted(leaked)}")
    return out


def check_covariates(covariates, outcomes) -> None:
    """ComBat covariates may never be outcome columns (nor derived from them by name)."""
    leaked = [c for c in covariates or [] if c in set(outcomes)]
    if leaked:
        raise ValueError(
            f"harmonization.covariates include the outcome column(s) {leaked}: ComBat must not see the "
            "outcome (the harmonised training features would be built from the labels, which new patients "
            "do not have). Protect biological covariates only (age, sex, ...)."
        )


def fitted_models(config: dict) -> list[tuple[str, str]]:
    """(endpoint, model) of every model the statistics stage fits and saves for a study config: each configured
    endpoint x `models.fit`, the deep model only with `features.deep.enabled` (without deep features it is not
    fitted). The workflow declares exactly these files, so the set follows the config, not the data."""
    settings = statistics_settings(config)
    deep = bool(config.get("features", {}).get("deep", {}).get("enabled", False))
    return [(endpoint, name) for endpoint in settings["endpoints"] for name in settings["models"]["fit"]
            if name != "deep" or deep]
