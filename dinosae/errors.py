"""The one hierarchy of errors a bad input raises (no torch, no third-party imports).

A `DinosaeError`'s message tells the whole story and names the file or config key: the CLI
prints it as one line and exits with status 2, no traceback. Anything else is a bug and keeps
its traceback. The second base class of each error is the builtin a caller may already catch.
"""

from __future__ import annotations


class DinosaeError(Exception):
    """Bad input, config, checkpoint, cache or weights; the message names it."""


class ConfigError(DinosaeError, ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class DataError(DinosaeError, ValueError):
    """Input images or shards that cannot be used; the message names the file."""


class FolderError(DataError):
    """An image folder (or its val label file) that cannot be used; the message names it."""


class MissingSplit(FolderError, FileNotFoundError):
    """The split's folder (e.g. val/) does not exist."""


class MissingShards(DataError, FileNotFoundError):
    """A shard folder without its manifest (never written, or still being written)."""


class CacheError(DinosaeError, ValueError):
    """A latent cache that must not be used (incomplete, stale, or not a cache)."""


class CheckpointError(DinosaeError, ValueError):
    """A checkpoint that must not be used: not ours, the wrong kind or stage, unsafe to load."""


class MissingCheckpoint(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist."""


class WrongCheckpointKind(CheckpointError, ConfigError):
    """A checkpoint of another kind than the argument or config key asks for (a DiT as --ae)."""


class ExportError(ConfigError):
    """An export folder whose config.json is unreadable or does not fit its tensors."""


class WeightsMismatchError(ConfigError):
    """Weights whose keys or shapes do not fit the module they are meant for (every mismatch is
    in the message)."""


class WeightsSourceError(DinosaeError, OSError):
    """A weights source that cannot be had (missing file, hub unreachable, ambiguous repo)."""


class WeightsFileError(DinosaeError, ValueError):
    """A weights file (.safetensors) that cannot be read; the message names it."""


class TeacherWeightsError(DinosaeError, RuntimeError):
    """The configured teacher weights cannot be had."""


class LPIPSWeightsError(DinosaeError, RuntimeError):
    """The LPIPS backbone weights cannot be had without a download."""


class NumericsError(DinosaeError, FloatingPointError):
    """Too many non-finite steps in a row: training stops rather than silently diverging."""


class OutputError(DinosaeError, ValueError):
    """An --out the command must not write: someone else's files, or a place it must not be."""


class OutputLocked(OutputError):
    """Another process is writing this output now."""


class NotRegularFile(DinosaeError, OSError):
    """An input path that is a FIFO, a device, a folder or a socket where a file is read (never
    opened for reading: it could block or never end)."""


class StatusError(DinosaeError, ValueError):
    """The results folder to report on does not exist (or a stage file cannot be read)."""
