"""The networks stage's settings, read from a study config without torch or the statistics stage's libraries: the
Snakefile reads them at every start."""

from __future__ import annotations

from radstudy.config import Study, settings
from radstudy.statistics.settings import statistics_settings

MULTITASK = "multitask"


def network_settings(study: Study) -> dict:
    return settings("networks", study.config["networks"])


def wants_gpu(study: Study) -> bool:
    """Whether the training job should ask the scheduler for a GPU: device cuda, or auto with segmentation.gpu."""
    device = network_settings(study)["device"]
    return device == "cuda" or (device == "auto" and bool(study.config["segmentation"]["gpu"]))


def fitted_networks(config: dict) -> list[tuple[str, str]]:
    """(endpoint, model) of every network the stage trains and saves: each configured endpoint x the per-endpoint
    models of networks.fit, and ("multitask", "multitask") for the multitask network (one for both endpoints);
    none when networks.enabled is false."""
    cfg = settings("networks", config.get("networks"))
    if not cfg["enabled"]:
        return []
    return [(endpoint, model) for endpoint in statistics_settings(config)["endpoints"] for model in cfg["fit"]
            if model != MULTITASK] + ([(MULTITASK, MULTITASK)] if MULTITASK in cfg["fit"] else [])
