# dinosae: DINO-SAE autoencoder -> latent cache -> RFM DiT -> samples -> gFID.
#   scripts/venv snakemake --cores 2                     # embedded default (config.yaml)
#   snakemake --profile slurm --workflow-profile workflow/profiles/imagenet256 \
#       --configfile workflow/configs/imagenet256.yaml results/gfid.txt   # paper scale
#   snakemake --report results/report.html             # plots, grids, tables, runtimes
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/autoencoder.smk"
include: "workflow/rules/latents.smk"
include: "workflow/rules/generation.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.fid.output,
        rules.eval_recon.output,
        REPORT_FILES,


# Wall-time chains (dinosae/chains.py): a training rule planned longer than the site's
# `max_runtime` resource (slurm/config.yaml) runs as a chain of jobs of at most that length.
chain_training_rules()
