"""radstudy: a multicenter radiomics study, from hospital DICOM folders to a validated prediction model.

Each stage is a module usable without Snakemake (and as a `radstudy <stage>` command);
the Snakemake rules in workflow/rules are thin calls into these modules.
"""

__version__ = "0.1.0"
