# dinosae: DINO-SAE autoencoder -> latent cache -> RFM DiT -> samples -> gFID.
#   scripts/venv snakemake --cores 2                     # embedded default (config.yaml)
#   snakemake --profile slurm --configfile workflow/configs/imagenet256.yaml results/gfid.txt
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/autoencoder.smk"
include: "workflow/rules/latents.smk"
include: "workflow/rules/generation.smk"
include: "workflow/rules/evaluation.smk"


rule all:
    default_target: True
    input:
        "results/gfid.txt",
        "results/recon.txt",
