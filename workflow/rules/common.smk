# Config and centers sheet validation, wildcard constraints and input functions: the rules hold no logic.
import pandas as pd

from radstudy.features import stage as features_stage
from radstudy.networks import settings as networks_settings
from radstudy.segment import stage as segmentation_stage
from radstudy.statistics.settings import fitted_models
from radstudy.config import load_study
from radstudy.errors import ConfigError

try:
    STUDY = load_study(config)
except ConfigError as error:
    raise WorkflowError(str(error))

CENTERS = [c.id for c in STUDY.centers]
DEMO = STUDY.config["demo"]["enabled"]
SEG = STUDY.config["segmentation"]
NNUNET = SEG["work_dir"]
NNUNET_DATASET = segmentation_stage.dataset_name(STUDY)
# where nnunet_train puts the model; the model used: the one given in the config, else that one
TRAINED_MODEL = str(segmentation_stage.trained_model_folder(STUDY, f"{NNUNET}/results"))
NNUNET_MODEL = str(SEG["model_folder"] or TRAINED_MODEL)
DEEP = STUDY.config["features"]["deep"]
# the radiomics parameter file(s): one, or one per channel (features.radiomics.params)
RADIOMICS_PARAMS = features_stage.radiomics_param_files(STUDY.config)
# Frozen once nnU-Net's dataset is built: a center added later is not trained on (segmentation.retrain_on_new_centers)
try:
    SEGMENTATION_TRAIN_CENTERS = segmentation_stage.train_centers(
        STUDY, f"{NNUNET}/raw/{NNUNET_DATASET}"
    )
except ConfigError as error:
    raise WorkflowError(str(error))


wildcard_constraints:
    center="|".join(CENTERS),
    patient=r"[A-Za-z0-9]+-\d{4}",


def center_input(center_id, attribute):
    """A center's delivered data (its dicom_root or clinical table), as a path Snakemake can track."""
    return str(getattr(STUDY.center(center_id), attribute))


def center_dicom_root(wildcards):
    return center_input(wildcards.center, "dicom_root")


def center_clinical_table(wildcards):
    return center_input(wildcards.center, "clinical")


def ingest_dirs_of(center):
    """Ingest folders of a center's delivered patients (known once discovery of the center has run)."""
    table = checkpoints.discover.get(center=center).output[0]
    patients = pd.read_csv(table, sep="\t", dtype=str)["patient"].tolist()
    return expand("results/ingest/{center}/{patient}", center=center, patient=patients)


def center_ingest_dirs(wildcards):
    return ingest_dirs_of(wildcards.center)


def train_ingest_dirs(wildcards):
    """Ingest folders of the patients of the centers nnU-Net is trained on."""
    return [d for center in SEGMENTATION_TRAIN_CENTERS for d in ingest_dirs_of(center)]


def all_ingest_dirs(wildcards):
    """Ingest folders of every center's patients."""
    return [d for center in CENTERS for d in ingest_dirs_of(center)]


def segmented_rows(pattern):
    """`pattern` for every patient whose segmentation passed QC (known once each center is segmented)."""

    def rows(wildcards):
        out = []
        for center in CENTERS:
            segmentation = checkpoints.segment_center.get(center=center).output[0]
            out += expand(
                pattern,
                center=center,
                patient=features_stage.segmented_patients(segmentation),
            )
        return out

    return rows


feature_rows = segmented_rows("results/features/{center}/{patient}.parquet")
ROBUSTNESS = STUDY.config["features"]["robustness"]


def perturbed_input(wildcards):
    """The perturbed-mask radiomics the statistics stage needs for the ICC filter; none when disabled."""
    if not ROBUSTNESS["enabled"]:
        return []
    return "results/features/perturbed.parquet"


# What the deep features read (an input of their rule): the user's checkpoint file, or the segmentation model
# folder (backbone nnunet)
DEEP_MODEL = str(DEEP["checkpoint"] or NNUNET_MODEL)


def deep_ingest_dirs(wildcards):
    """Ingest folders of the center's patients whose segmentation passed QC."""
    segmentation = checkpoints.segment_center.get(center=wildcards.center).output[0]
    return expand(
        "results/ingest/{center}/{patient}",
        center=wildcards.center,
        patient=features_stage.segmented_patients(segmentation),
    )


def deep_tables(kind):
    """Every center's deep-feature table (kind "parquet"), issues ("issues.tsv") or extractor settings
    ("meta.json"); none when disabled."""
    if not DEEP["enabled"]:
        return []
    return expand("results/features/deep/{center}.{kind}", center=CENTERS, kind=kind)


# The models the statistics stage fits and saves, as the config says (endpoints x models.fit; deep with deep
# features): one declared file each, so that deleting one reruns the stage and what depends on it.
FITTED_MODELS = fitted_models(STUDY.config)
MODEL_FILES = [
    f"results/models/{endpoint}/{model}.joblib" for endpoint, model in FITTED_MODELS
]
# every split's models too (models.save_split_models): the splits follow the design, so one folder
SPLIT_MODELS = (
    [directory("results/models/splits")]
    if STUDY.config["models"]["save_split_models"]
    else []
)
# the end-to-end networks (networks.enabled): one saved network per endpoint x networks.fit (primary split)
NETWORKS = networks_settings.network_settings(STUDY)
FITTED_NETWORKS = networks_settings.fitted_networks(STUDY.config)
# the user's pretrained weights (networks.checkpoint), which the training reads: an input, so that new weights retrain
NETWORK_CHECKPOINT = NETWORKS["checkpoint"] or []
NETWORK_FILES = [
    f"results/networks/{endpoint}/{model}.pt" for endpoint, model in FITTED_NETWORKS
]
# the multitask network (networks.fit: multitask): its DSC in the crop joins nnU-Net's in results/segmentation/dsc.tsv;
# with multitask.encoder nnunet it starts from the study's nnU-Net, an input (a retrained nnU-Net retrains it)
MULTITASK = "multitask" in NETWORKS["fit"] and NETWORKS["enabled"]
MULTITASK_NNUNET = (
    NNUNET_MODEL if MULTITASK and NETWORKS["multitask"]["encoder"] == "nnunet" else []
)


def network_predictions(wildcards):
    """The networks' predictions, which the statistics stage joins to its own; none when disabled."""
    return "results/networks/predictions.tsv" if NETWORKS["enabled"] else []


def network_report_inputs(wildcards):
    """What the report shows of the networks: their training history and saliency maps; none when disabled."""
    if not NETWORKS["enabled"]:
        return []
    return ["results/networks/history.tsv", "results/networks/saliency"]


# the combined model per endpoint: SHAP and the nomogram of the report
EXPLAINED_MODELS = {
    endpoint: f"results/models/{endpoint}/{model}.joblib"
    for endpoint, model in FITTED_MODELS
    if model == "combined"
}


def study_targets():
    """What a study delivers: Snakemake reruns a job only for a missing file that something asks for, so every
    deliverable is asked for here (a deleted fitted model reruns the statistics stage and the report).
    """
    return [
        "results/segmentation/dsc.tsv",
        "results/features/features.parquet",
        "results/models/predictions.tsv",
        "results/report/report.html",
        "results/qc/patients.tsv",
        "results/qc/exclusions.tsv",
        "results/qc/patient_flow.tsv",
        "results/clinical/clinical.tsv",
        *rules.statistics.output,
        *rules.segmentation_quality.output,
        *rules.feature_table.output,
        *rules.evaluate_report.output,
        *(rules.networks.output if NETWORKS["enabled"] else []),
    ]
