# limbtrack: longitudinal limb volumetry on serial MRI (see README.md and docs/design.md).
# Wiring only: every step is a thin call into the importable package `pipeline/`.
import json
import shlex
import sys

from snakemake.logging import logger
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import min_version, validate

from pipeline.workflow import (
    pass_research_salt,
    as_flag,
    baseline_session,
    convert_command,
    index_first_advice,
    index_targets,
    index_args,
    is_dicom_input,
    lift_default_submission_limit,
    limbtrack_command,
    input_digest,
    load_subjects,
    registration_reference,
    session_entry_digest,
    session_labels,
)

min_version("9.0")


configfile: "config/config.yaml"


# Command-line values such as day0=2024-03-01 may arrive parsed as dates or numbers.
for _key in ("subject", "day0", "input_dir", "results_dir", "events", "subjects_sheet", "patient"):
    config[_key] = str(config.get(_key, ""))
# Values from the command line may arrive as text: --config show_phi=true 'export={dicom: true}'.
config["show_phi"] = as_flag(config.get("show_phi", False))
for _key, _value in list(config.get("export", {}).items()):
    config["export"][_key] = as_flag(_value)
config["research"]["export"] = as_flag(config["research"].get("export", False))
pass_research_salt(config)
validate(config, "config/schema.yaml")

# Every rule runs "{params.limbtrack} <subcommand> ..." with params limbtrack=LIMBTRACK
# (pipeline/cli.py maps subcommands to modules): the interpreter running Snakemake, or with
# --use-conda the python of the rule's conda environment (environment.yml).
USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
LIMBTRACK = limbtrack_command(sys.executable, USE_CONDA, workflow.basedir)
RESULTS = config["results_dir"].rstrip("/")
SUBJECTS = load_subjects(config)
SUBJECT_DIR = f"{RESULTS}/{{subject}}"
SESSION_DIR = f"{SUBJECT_DIR}/ses-{{session}}"
SESSION_STEM = f"{SESSION_DIR}/sub-{{subject}}_ses-{{session}}"


wildcard_constraints:
    subject="[A-Za-z0-9]+",
    session=r"[0-9]{8}(T[0-9]{6})?",


include: "rules/common.smk"
include: "rules/ingest.smk"
include: "rules/analysis.smk"
include: "rules/report.smk"
include: "rules/export.smk"


FINAL = ["volumes.tsv", "longitudinal.tsv", "summary.json", "report.html"]
if config["export"]["viewers"] or config["export"]["dicom"]:
    FINAL.append("dataset_description.json")
if config["research"]["export"]:
    FINAL.append("research")


COHORT = [f"{RESULTS}/cohort.html", f"{RESULTS}/cohort.tsv"] if config["subjects_sheet"] else []


rule all:
    input:
        expand(
            f"{SUBJECT_DIR}/{{name}}",
            subject=sorted(SUBJECTS),
            name=FINAL,
        ),
        COHORT,
    default_target: True


rule index_all:
    # Every subject's index and nothing more: the first run of a large cohort (README,
    # "Cohorts"), so that the second one knows every subject's sessions when it builds its DAG
    # (pipeline.workflow.index_first_advice). `limbtrack run --cohort` runs both.
    input:
        index_targets(RESULTS, SUBJECTS),


onstart:
    # Snakemake's own CPU linear in the cohort: see pipeline.workflow (a timer pile-up)
    lift_default_submission_limit(workflow.scheduler)
    _advice = index_first_advice(
        sum(1 for job in workflow.dag.needrun_jobs() if job.rule.name == "index"),
        {job.rule.name for job in workflow.dag.targetjobs},
    )
    if _advice:
        logger.warning(f"limbtrack: {_advice}")


onerror:
    # With --keep-going a failed subject stops the cohort rule; still list every subject,
    # the failed ones with the reason from their logs.
    if config["subjects_sheet"]:
        # Snakemake's own process, outside any rule's environment
        dirs = " ".join(shlex.quote(f"{RESULTS}/{s}") for s in sorted(SUBJECTS))
        html, tsv = (shlex.quote(f"{RESULTS}/cohort.{ext}") for ext in ("html", "tsv"))
        shell(
            f"{limbtrack_command(sys.executable)} cohort --subject-dirs {dirs}"
            f" --out-html {html} --out-tsv {tsv} || true"
        )
