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


def cfg(*sections):
    """The named config sections as one shell-quoted JSON argument for `dinosae ... --cfg`."""
    return shlex.quote(json.dumps({s: config[s] for s in sections}, sort_keys=True))


def dataset_root():
    """The ImageNet-style folder: built by rule mini_dataset, or the user's own."""
    return config["data"]["root"]


def launch(wildcards, resources):
    """`dinosae` for one process; torchrun over the job's GPUs when a rule asks for several."""
    gpus = int(resources.get("gpu", 0))
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node={gpus} -m dinosae"
    return "dinosae"


def shard_folder(wildcards, input):
    """The shard folder of a rule's `shards` input (its manifest.json)."""
    return os.path.dirname(str(input.shards))


def run_folder(wildcards, output):
    """The folder of a training rule's checkpoint.pt, where its metrics and grids go too."""
    return os.path.dirname(output[0])


def store_of(wildcards):
    """The latent store of an encode job's split."""
    return latent_store(wildcards.split)
