# Included first, shared by every .smk: config validation before any job starts, the paths
# that several files need, and the helpers that wire config sections and paths to `dinosae`.
# Everything else a rule needs from an earlier one it takes through `rules.<name>.output`.
import json
import os
import shlex

from dinosae.config import validate
from dinosae.errors import ConfigError

try:
    validate(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

SHARDS = config["data"]["shards"]
LOGS = "results/logs"

# Released weights instead of training (rules import_autoencoder, import_dit): the import writes
# the very file training would (ruleorder picks it), so consumers name the file, not the rule.
PRETRAINED_AE = config["autoencoder"].get("pretrained")
PRETRAINED_DIT = config["dit"].get("pretrained")


def ae_checkpoint(stage):
    """The checkpoint of autoencoder stage `stage` (a number or "{k}")."""
    return f"results/ae/stage{stage}/checkpoint.pt"


# the autoencoder (from ae_stage4 or import_autoencoder) and the generator (train_dit, import_dit)
AE_CHECKPOINT = ae_checkpoint(4)
DIT_CHECKPOINT = "results/dit/checkpoint.pt"
# FD_teacher's extractor, the frozen teacher, is the same in every stage: stage 1 when training
# (ready early), else the imported checkpoint
TEACHER_AE = ae_checkpoint(4 if PRETRAINED_AE else 1)


def latent_store(split):
    """The zarr store of a split's latent cache. Snakemake never writes into it (its files
    would sit among zarr's): the encode rules output flag files beside it and pass it on as
    a parameter."""
    return f"results/latents/{split}.zarr"


# latents.root: caches shared by content (dinosae/latents/shared.py). A complete cache made
# from this experiment's autoencoder (its checkpoint, or the dinosae checkpoint it imports) and
# shards is used read-only from there, and no encode job is planned; otherwise the encode rules
# build it here and publish it there (leaving a link here, and this experiment keeps using its
# own path, so that a later run plans the same jobs).
SHARED_CACHE = None
if (
    config["latents"].get("root")
    and not PRETRAINED_DIT
    and not os.path.lexists(latent_store(config["latents"]["split"]))
):
    from dinosae.latents.shared import find_for

    SHARED_CACHE = find_for(
        config["latents"],
        (
            AE_CHECKPOINT
            if os.path.isfile(AE_CHECKPOINT) or not PRETRAINED_AE
            else PRETRAINED_AE
        ),
        f"{SHARDS}/{config['latents']['split']}/manifest.json",
    )
# the cache the DiT trains on, and what its rules take as input for it
CACHE = str(SHARED_CACHE or latent_store(config["latents"]["split"]))


# Where training runs log besides metrics.csv (logging.backends: tensorboard, wandb): handed to
# the jobs in their environment, not as a param, so that choosing another backend does not rerun
# a finished training (dinosae/train/logs.py reads it when a job's config has no logging section).
# Set here, not read: on a cluster the job's own snakemake sets it again from the same config.
os.environ.update(
    DINOSAE_LOGGING=",".join(config.get("logging", {}).get("backends", ["csv"]))
)
# The gFID proxy of DiT training (dit.eval_every): train_dit then also reads the reference
# statistics (rule fid_reference) and the eval section.
GFID_PROXY = bool(config["dit"].get("eval_every"))


def cfg(*sections):
    """The named config sections as one shell-quoted JSON argument for `dinosae ... --cfg`."""
    return shlex.quote(json.dumps({s: config[s] for s in sections}, sort_keys=True))


def dataset_root():
    """The ImageNet-style folder: built by rule mini_dataset, or the user's own."""
    return config["data"]["root"]


def launch(wildcards, resources):
    """`dinosae` for one process; torchrun over the job's GPUs when a rule asks for several;
    srun + torchrun over its nodes when it asks for several nodes (dinosae.multinode)"""
    if int(resources.get("nodes", 1) or 1) > 1:
        from dinosae.multinode import gpus_per_node, torchrun_command

        return torchrun_command(int(resources["nodes"]), gpus_per_node(resources))
    gpus = int(resources.get("gpu", 0))
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node={gpus} -m dinosae"
    return "dinosae"


def shard_folder(wildcards, input):
    """The shard folder of a rule's `shards` input (its manifest.json)."""
    return os.path.dirname(str(input.shards))


def micro_batch(key):
    """`--set KEY=N` when the workflow profile gives the rule a `micro_batch` resource (the
    largest that fits its GPU: `dinosae plan --gpu`), else nothing. KEY is the rule's batch per
    GPU and forward/backward (dinosae.microbatch.CONFIG_KEY): a training rule's micro-batch
    (gradient accumulation makes up its batch), another rule's batch. A param that reads
    resources is not a rerun trigger: a finished rule does not rerun for it."""

    def flag(wildcards, resources):
        n = resources.get("micro_batch")
        return f"--set {key}={int(n)}" if n else ""

    return flag


def reference_shards(wildcards, input):
    """--shards for fid-reference: the split's shard folder (none with ADM's reference)."""
    if not input.shards:
        return ""
    return f"--shards {shlex.quote(os.path.dirname(str(input.shards)))}"


def run_folder(wildcards, output):
    """The folder of a training rule's checkpoint.pt, where its metrics and grids go too."""
    return os.path.dirname(output[0])


def store_of(wildcards):
    """The latent store of an encode job's split."""
    return latent_store(wildcards.split)


def chain_training_rules():
    """The training rules as wall-time chains where their planned runtime exceeds the site's
    max_runtime (dinosae.chains.chain_rule); the write rate for the signal lead is measured
    into results/ once, and only when some rule needs it."""
    from functools import cache

    from dinosae.chains import chain_rule, measure_write_mb_s

    if not workflow.is_main_process:  # a job's own Snakemake: no retries inside the job
        return
    rate = cache(lambda: measure_write_mb_s("results"))
    for name in [f"ae_stage{k}" for k in (1, 2, 3, 4)] + ["train_dit"]:
        try:
            s = chain_rule(workflow.get_rule(name), rate)
        except ValueError as e:  # a max_runtime too short for this rule's chain
            raise ValueError(f"{name}: {e}") from None
        if s is not None and s["jobs"] > 1:
            logger.info(
                f"{name}: a chain of up to {s['jobs']} jobs of {s['runtime']} min, each "
                f"stopping itself ahead of its limit (Slurm's {s['signal'] or 'SIGTERM at the limit'}"
                " the backstop)"
            )
