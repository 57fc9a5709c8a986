"""The `dinosae` command line: one subcommand per pipeline step.

Snakemake rules call these with explicit paths and the config sections the step depends on
(`--cfg JSON`); people can use `--config config.yaml` and `--set key=value` instead.

    dinosae shard --config config.yaml --split train --out data/shards/train
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import math
import os
import sys
import traceback

from dinosae.config import load_config
from dinosae.errors import DinosaeError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
AE_HELP = "AE checkpoint whose teacher is the 'teacher' extractor"
RESTART = ("--restart", dict(action="store_true",
                             help="start afresh even if --out holds another run's last.pt"))
FORCE = ("--force", dict(action="store_true",
                         help="replace an existing --out that this command did not write"))
# libraries that read files: their own exceptions, and data errors raised inside them, are
# about a bad input file (printed as one line), not a bug in dinosae
FILE_LIBRARIES = ("yaml", "json", "safetensors", "PIL", "zarr", "numcodecs", "h5py", "tarfile",
                  "webdataset", "_csv", "csv", "zipfile")
DATA_ERRORS = (ValueError, KeyError, IndexError, EOFError, OSError, UnicodeError, OverflowError)

def _number(kind: type, low: float | None = None, high: float | None = None,
            above: float | None = None):
    """An argparse type: a finite `kind` (int or float) within the bounds (NaN, inf and
    out-of-range values are refused with one line naming the flag)."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {what}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a finite number")
        if (low is not None and value < low) or (high is not None and value > high) or (
                above is not None and value <= above):
            bounds = " and ".join(b for b in (f">= {low}" if low is not None else "",
                                              f"> {above}" if above is not None else "",
                                              f"<= {high}" if high is not None else "") if b)
            raise argparse.ArgumentTypeError(f"{value} is out of range (expected {bounds})")
        return value
    parse.__name__ = kind.__name__
    return parse


POSINT = _number(int, low=1, high=2**53 - 1)
NONNEGINT = _number(int, low=0, high=2**53 - 1)
STEPS, BATCH, GPUS = (_number(int, low=1, high=h) for h in (100_000, 65536, 1_000_000))
FRACTION = _number(float, above=0.0, high=1.0)
RUNTIME = _number(float, above=0.0, high=1e7)  # minutes


def _part(text: str) -> tuple[int, int]:
    """An argparse type: `i/K`, part i (from 0) of K."""
    i, sep, k = text.partition("/")
    try:
        index, parts = int(i), int(k)
    except ValueError:
        index, parts = -1, 0
    if not sep or not 0 <= index < parts <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not i/K with 0 <= i < K (e.g. 0/8)")
    return index, parts


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `dinosae COMMAND: error: ...`, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message, 500)} (see {self.prog} -h)\n")


# name -> (module, function, help, [(flag, argparse kwargs), ...]); each function is called as
# function(cfg, **args) with the flags' values under their python names.
COMMANDS: dict[str, tuple[str, str, str, list[tuple[str, dict]]]] = {
    "validate-config": ("dinosae.config", "validate", "validate a config and exit", []),
    "mini-dataset": (
        "dinosae.data.mini", "build_mini_dataset",
        "build the embedded dataset from scikit-image's photographs (ImageNet folder layout)",
        [("--out", dict(required=True, help="output folder (gets train/ and val/)")), FORCE],
    ),
    "shard": (
        "dinosae.data.shard", "shard_split",
        "preprocess one split of an ImageNet-style folder into webdataset tars + manifest.json",
        [("--split", dict(required=True, choices=["train", "val"])),
         ("--out", dict(required=True, help="output folder for the tars and manifest.json")),
         FORCE],
    ),
    "ae-train": (
        "dinosae.train.ae", "train_stage", "train one autoencoder stage (1-4)",
        [("--stage", dict(type=int, required=True, choices=[1, 2, 3, 4])),
         ("--shards", dict(required=True, help="train shard folder (with manifest.json)")),
         ("--init", dict(default=None, help="previous stage's checkpoint")),
         ("--out", dict(required=True, help="stage folder: checkpoint.pt, metrics.csv, grids")),
         FORCE, RESTART],
    ),
    "eval-recon": (
        "dinosae.evaluate", "eval_recon", "reconstruction metrics on the val split -> recon.txt",
        [("--checkpoint", dict(required=True)), ("--shards", dict(required=True)),
         ("--out", dict(required=True)), FORCE],
    ),
    "encode-init": (
        "dinosae.latents", "encode_init", "create the latent cache arrays and attributes",
        [("--shards", dict(required=True)), ("--checkpoint", dict(required=True)),
         ("--out", dict(required=True, help="the .zarr store")), FORCE],
    ),
    "encode-part": (
        "dinosae.latents", "encode_part", "encode one shard-aligned region of the cache",
        [("--cache", dict(required=True)), ("--shards", dict(required=True)),
         ("--checkpoint", dict(required=True)), ("--index", dict(type=NONNEGINT, required=True)),
         ("--parts", dict(type=POSINT, required=True)), ("--done", dict(required=True))],
    ),
    "encode-gather": (
        "dinosae.latents", "encode_gather", "validate every region, then mark the cache complete",
        [("--cache", dict(required=True)), ("--out", dict(required=True, help="report json")),
         FORCE],
    ),
    "export-latents": (
        "dinosae.export", "export_latents",
        "write a latent cache's arrays and attributes to HDF5",
        [("--cache", dict(required=True)), ("--out", dict(required=True)), FORCE],
    ),
    "cache": (
        "dinosae.latents.commands", "cache_command",
        "latent caches: list [ROOT] (default latents.root), verify PATH, path (of --config's)",
        [("action", dict(choices=["list", "verify", "path"])),
         ("path", dict(nargs="?", default=None, help="list: the root; verify: the cache"))],
    ),
    "train-dit": (
        "dinosae.train.dit", "train_dit", "train the RFM DiT on the latent cache",
        [("--cache", dict(required=True)), ("--ae", dict(required=True)),
         ("--out", dict(required=True)),
         ("--reference", dict(default=None, help="reference statistics (fid-reference) for "
                                                 "the gFID proxy, dit.eval_every")),
         FORCE, RESTART],
    ),
    "sample": (
        "dinosae.generate", "sample_to_h5", "class-balanced samples -> HDF5 (+ PNG grid)",
        [("--dit", dict(required=True)), ("--ae", dict(required=True)),
         ("--cache", dict(default=None, help="the latent cache the DiT was trained on (class "
                                            "names, checks); none for an imported generator")),
         ("--out", dict(required=True, help="samples.h5 (the grid .png and the .npz go beside "
                                            "it); with --part, the part's .h5")),
         ("--part", dict(type=_part, default=None, metavar="I/K",
                         help="only part I of K (whole batches), for sample-gather")), FORCE],
    ),
    "sample-gather": (
        "dinosae.generate", "gather_parts",
        "the K part files of `sample --part I/K` -> the samples.h5 one job writes (+ PNG grid)",
        [("--parts", dict(required=True, nargs="+", help="the part files, in part order")),
         ("--dit", dict(required=True, help="the DiT the parts were sampled from")),
         ("--ae", dict(required=True, help="the AE that decoded them")),
         ("--out", dict(required=True, help="samples.h5")), FORCE],
    ),
    "generate": (
        "dinosae.api", "generate_images",
        "samples of chosen classes and seeds from a generator -> a PNG grid or an npz",
        [("--model", dict(required=True, help="export folder, DiT checkpoint or hf-hub:...")),
         ("--classes", dict(required=True, help="class indices, e.g. 207,360 or 0-9")),
         ("--seeds", dict(default="0-7", help="noise seeds, e.g. 0-7 (default) or 1,5,9")),
         ("--out", dict(required=True, help="grid.png (a row per class) or samples.npz")),
         ("--steps", dict(type=STEPS, default=50)),
         ("--cfg-scale", dict(type=_number(float, low=0.0), default=1.0,
                              help="classifier-free guidance (1: off)")),
         ("--interval", dict(default="0,1", help="guidance interval lo,hi in t (1 = noise)")),
         ("--s-vae", dict(type=_number(float, above=0.0), default=None,
                          help="decode radius (default: the generator's recorded one; paper 14)")),
         ("--integrator", dict(default="euler_project", choices=["euler_project", "expmap"])),
         ("--ae", dict(default=None, help="autoencoder (default: bundled with the export or "
                                          "recorded in the checkpoint)")),
         ("--batch-size", dict(type=BATCH, default=16)),
         ("--device", dict(default="auto", help="auto | cpu | cuda[:N]")),
         ("--force", dict(action="store_true", help="replace an existing --out"))],
    ),
    "fid-reference": (
        "dinosae.evaluate", "fid_reference", "reference feature statistics of real images",
        [("--shards", dict(default=None, help="shard folder of the reference split (not with "
                                              "eval.adm_reference)")),
         ("--out", dict(required=True)),
         ("--ae", dict(default=None, help=AE_HELP)), FORCE],
    ),
    "fid": (
        "dinosae.evaluate", "fid",
        "FID, sFID, IS, precision/recall as ADM's evaluator (or FD in the teacher) -> gfid.txt",
        [("--samples", dict(required=True)), ("--reference", dict(required=True)),
         ("--out", dict(required=True)),
         ("--ae", dict(default=None, help=AE_HELP)), FORCE],
    ),
    "export-model": (
        "dinosae.export", "export_model",
        "an AE or DiT checkpoint -> a portable folder (config.json + model.safetensors, EMA)",
        [("--checkpoint", dict(required=True)),
         ("--out", dict(required=True, help="output folder")),
         ("--ae", dict(default=None, help="DiT only: the AE to bundle (default: its own)")),
         FORCE],
    ),
    "import-ae": (
        "dinosae.importers", "import_autoencoder",
        "released (official DINO-SAE) or exported AE weights -> a stage-4 checkpoint",
        [("--source", dict(default=None, help="file, folder or hf-hub:<owner>/<name>[/<file>]; "
                                              "default autoencoder.pretrained")),
         ("--out", dict(required=True)), FORCE],
    ),
    "import-dit": (
        "dinosae.importers", "import_generator",
        "a dinosae, RAE (DiTwDDTHead, LightningDiT) or hustvl LightningDiT generator -> a "
        "DiT checkpoint",
        [("--source", dict(default=None, help="file, folder or hf-hub:...; default "
                                              "dit.pretrained")),
         ("--out", dict(required=True)), FORCE],
    ),
    "plan": (
        "dinosae.plan", "plan",
        "FLOPs, GPU-hours, wall time, GPU memory and disk of every rule of a config, measured "
        "on the configured networks before any GPU is booked",
        [("--gpu", dict(default="h100", help="GPU kind from dinosae/gpus.yaml: a100-40, "
                                              "a100-80, h100, h200, b200 (default h100); the "
                                              "plan chooses each rule's largest micro-batch "
                                              "that fits it")),
         ("--gpus", dict(type=GPUS, default=8, help="GPUs (training rules: data-parallel over "
                                                   "all of them; default 8)")),
         ("--mfu", dict(type=FRACTION, default=None, help="model-FLOPs utilisation, the fraction "
                                                       "of peak reached (default: calibrated, "
                                                       "see README 'Planning a run')")),
         ("--train-images", dict(type=POSINT, default=None, help="override the train split's "
                                                              "image count")),
         ("--val-images", dict(type=POSINT, default=None, help="override the val split's "
                                                            "image count")),
         ("--max-runtime", dict(type=RUNTIME, default=None, help="the site's job time limit "
                                                                 "(minutes): print the jobs of "
                                                                 "each training rule's chain"))],
    ),
    "status": (
        "dinosae.status", "status",
        "which stages of a results folder are done, their key metrics and the checkpoint each used",
        [("--results", dict(default="results", help="the results folder (default: results)"))],
    ),
    "stage-figures": (
        "dinosae.report", "stage_figures",
        "report figures of a training run: loss curves (metrics.csv), its last image grid",
        [("--checkpoint", dict(required=True, help="the run's checkpoint.pt (files beside it)")),
         ("--title", dict(required=True)), ("--loss", dict(required=True, help="PNG")),
         ("--grid", dict(default=None, help="PNG: an AE stage's last input | recon grid")),
         FORCE],
    ),
    "sample-grids": (
        "dinosae.report", "sample_grids", "one sample grid per class, for the report",
        [("--samples", dict(required=True, help="samples.h5")),
         ("--out", dict(required=True, nargs="+", help="one PNG per class shown")), FORCE],
    ),
    "metrics-table": (
        "dinosae.report", "metrics_table", "a key: value results file -> an HTML table",
        [("--results", dict(required=True)), ("--title", dict(required=True)),
         ("--out", dict(required=True)), FORCE],
    ),
    "config-page": (
        "dinosae.report", "config_page", "the config used -> an HTML page (for the report)",
        [("--out", dict(required=True)), FORCE],
    ),
}
# commands that need no config (the checkpoint or the results files carry it)
NO_CONFIG = {"export-model", "status", "stage-figures", "sample-grids", "metrics-table",
             "generate", "cache"}
# commands that read config.yaml when given no config, and need none of its paths to exist
DEFAULT_CONFIG = {"plan": "config.yaml"}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dinosae", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, help_, args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", "--configfile", dest="config", default=None,
                       help="YAML config file (e.g. config.yaml)")
        p.add_argument("--cfg", default=None, help="config sections as JSON (used by the rules)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set dit.steps=100")
        for flag, kwargs in args:
            p.add_argument(flag, **kwargs)
    return parser


def _one_line(text: str, limit: int = 2000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _library(e: BaseException) -> str | None:
    """The file-reading library `e` comes from (its own class, or a data error raised inside
    it), or None: then it is a bug in dinosae."""
    for cls in type(e).__mro__:
        root = cls.__module__.split(".")[0]
        if root in FILE_LIBRARIES:
            return root
    if isinstance(e, DATA_ERRORS) and e.__traceback__ is not None:
        frame = traceback.extract_tb(e.__traceback__)[-1].filename
        parts = frame.replace(os.sep, "/").split("/")
        return next((lib for lib in FILE_LIBRARIES if lib in parts or f"{lib}.py" in parts), None)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every bad input ends as one line on stderr and exit status 2: a
    DinosaeError (its message names the file or key), or an error a file-reading library raised
    (yaml, json, safetensors, PIL, zarr, h5py, ...) that no read site turned into one; a full
    disk is exit 1. Anything else is a bug and shows its traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    module, function, _, flags = COMMANDS[args.command]
    name = f"dinosae {args.command}"
    if args.config is None and args.cfg is None and args.command in DEFAULT_CONFIG:
        args.config = DEFAULT_CONFIG[args.command]
    try:
        cfg = load_config(args.config, args.cfg, args.set,
                          check_paths=args.command not in DEFAULT_CONFIG)
        if args.config is None and args.cfg is None and args.command not in NO_CONFIG:
            print("dinosae: give --config FILE or --cfg JSON", file=sys.stderr)
            return 2
        kwargs = {f.lstrip("-").replace("-", "_"): getattr(args, f.lstrip("-").replace("-", "_"))
                  for f, _ in flags}
        fn = getattr(importlib.import_module(module), function)
        fn(cfg, **kwargs)
    except DinosaeError as e:  # bad input, config, checkpoint or cache: the message says it all
        print(f"{name}: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno in DISK_FULL:
            print(f"{name}: no space left for writing: {_one_line(e)}; nothing partial was "
                  "kept, free some space and rerun", file=sys.stderr)
            return 1
        if e.filename is None and _library(e) is None:
            raise
        print(f"{name}: {_one_line(e)}", file=sys.stderr)  # names the file it could not use
        return 2
    except Exception as e:
        lib = _library(e)
        if lib is None:
            raise
        print(f"{name}: a file could not be read ({lib}: {type(e).__name__}: "
              f"{_one_line(e, 500)})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
