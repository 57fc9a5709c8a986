# Helpers shared by the rules: config validation (before any job starts) and the JSON of the
# config sections each rule depends on (a changed value reruns exactly the rules that use it).
import json
import shlex

from dinosae.config import ConfigError, validate

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
