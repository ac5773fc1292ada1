# The embedded demo study: a synthetic multicenter cohort written as the hospitals would deliver it.
if DEMO:

    rule demo_cohort:
        output:
            dicom=[directory(center_input(c, "dicom_root")) for c in CENTERS],
            clinical=[center_input(c, "clinical") for c in CENTERS],
            # the whole folder, so that a rerun (new generator code) starts from an empty one
            truth=directory(f"{STUDY.config['demo']['out_dir']}/ground_truth"),
        log:
            "results/logs/demo_cohort.log",
        benchmark:
            "results/benchmarks/demo_cohort.tsv"
        conda:
            "../../envs/ingest.yaml"
        threads: STUDY.config["demo"]["workers"]
        script:
            "../scripts/demo_cohort.py"
