# Helpers shared by the rules: config validation (before any job starts) and the JSON of the
# config sections each rule depends on (a changed value reruns exactly the rules that use it).
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
    return os.path.dirname(input.shards)
