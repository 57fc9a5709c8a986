"""Mutation check: plant plausible one-line bugs, one at a time, in a COPY of the repository and
see whether the fast tests that should catch each one fail.

    PYTHONPATH=$PWD python bench/mutate.py                 # every mutant, a markdown table
    PYTHONPATH=$PWD python bench/mutate.py --list          # the mutants and their tests
    PYTHONPATH=$PWD python bench/mutate.py --only ema_inverted hinge_swapped -j 2

The copy (the files git tracks or would track, under a temporary folder) is made once; each
mutant replaces one exact piece of text (it must occur exactly once in its file, so a mutant
whose line changed is reported as "stale", not silently skipped), the mutated file must still
compile, and `pytest -m "not integration" -x` runs on the few test files/tests named for it
(`tests`). Caught: pytest exits with failures (exit 1). Missed: the tests pass. The worktree
itself is never modified. A baseline run of every named test on the unmutated copy comes first
(--no-baseline skips it): a mutant is only "caught" if the tests passed without it.

When the code a mutant names changes, update its `old`/`new` text; when a new test catches a
class of bug, add a mutant for it. Keep each mutant's test selection small: one pytest process
per mutant (a fork of this process, torch & co already imported): 1-6 s each on an
idle 2-core machine; all 49 with -j 2 in about 2 minutes, baseline included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    old: str  # exact text, occurring once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, or "-k", "expr"
    why: str  # the bug in words


OBJ = "tests/test_objective.py"
BOOK = "tests/test_loops_bookkeeping.py"
AEL = "tests/test_ae_losses.py"
MET = "tests/test_metrics_independent.py"
GRD = "tests/test_guards.py"
WS = "tests/test_world_size.py"

MUTANTS = [
    # ---- the objective training runs
    Mutant("velocity_sign", "dinosae/sphere.py",
           "return r * (c * xh + s * uh), r * omega * (c * uh - s * xh)",
           "return r * (c * xh + s * uh), r * omega * (c * uh + s * xh)",
           (OBJ,), "slerp_and_velocity: wrong sign in the velocity"),
    Mutant("path_swapped", "dinosae/rfm.py",
           "return sphere.slerp_and_velocity(z0, z1, t, self.r)",
           "return sphere.slerp_and_velocity(z1, z0, t, self.r)",
           (OBJ,), "SpherePath.point_and_target: data and noise swapped"),
    Mutant("radial_without_lambda", "dinosae/rfm.py",
           "return tan + lambda_rad * rad, {",
           "return tan + rad, {",
           (OBJ,), "SpherePath.loss_at: the radial term without its lambda"),
    Mutant("tangent_error_unsplit", "dinosae/rfm.py",
           "return (v_tan - u).square().mean(), v_rad.square().mean()",
           "return (v - u).square().mean(), v_rad.square().mean()",
           (OBJ,), "rfm_loss_at: the tangent error on the whole prediction"),
    Mutant("flow_loss_at_default_lambda", "dinosae/rfm.py",
           "return flow_path(path, 1.0).loss_at(model_out, zt, u, lambda_rad)",
           "return flow_path(path, 1.0).loss_at(model_out, zt, u, 0.1)",
           (OBJ,), "flow_loss_at: the configured lambda dropped"),
    Mutant("euclidean_reversed", "dinosae/rfm.py",
           "return (1.0 - t) * z0 + t * z1",
           "return t * z0 + (1.0 - t) * z1",
           (OBJ,), "EuclideanPath.interpolate: the path runs backwards"),
    Mutant("time_shift_inverted", "dinosae/rfm.py",
           "return alpha * t / (1.0 + (alpha - 1.0) * t)",
           "return t / (alpha + (1.0 - alpha) * t)",
           (BOOK, "-k", "draw_inputs"), "shift_time: pushes the times towards the data"),
    Mutant("train_step_swapped", "dinosae/train/dit.py",
           "zt, u = rfm.point_and_target(z0, z1, t, r, path)",
           "zt, u = rfm.point_and_target(z1, z0, t, r, path)",
           (OBJ, "-k", "train_step"), "train_step: data and noise swapped"),
    Mutant("train_step_time_flipped", "dinosae/train/dit.py",
           "out = model(zt, t, y)",
           "out = model(zt, 1 - t, y)",
           (OBJ, "-k", "train_step"), "train_step: the network sees 1 - t"),
    # ---- the loops' bookkeeping
    Mutant("dropout_inverted", "dinosae/train/dit.py",
           "y = torch.where(drop < label_dropout,",
           "y = torch.where(drop > label_dropout,",
           (BOOK, "-k", "dropout"), "draw_inputs: 90% null labels instead of 10%"),
    Mutant("null_class_zero", "dinosae/train/dit.py",
           "torch.full_like(y, null_class), y)",
           "torch.full_like(y, 0), y)",
           (BOOK, "-k", "dropout"), "draw_inputs: dropped labels become class 0"),
    Mutant("same_draws_every_step", "dinosae/train/dit.py",
           "draw_rows(z0, y, seed, step, my_rows(rank, local_batch)",
           "draw_rows(z0, y, seed, 0, my_rows(rank, local_batch)",
           (BOOK, "-k", "dit_loop_lr"), "DiT loop: the same noise/times at every step"),
    Mutant("dit_lambda_not_configured", "dinosae/train/dit.py",
           'lambda_rad=dc["lambda_rad"]',
           "lambda_rad=0.1",
           (BOOK, "-k", "dit_loop_lr"), "DiT loop: dit.lambda_rad ignored"),
    Mutant("dit_lr_off_by_one", "dinosae/train/dit.py",
           'lr = lr_at(step, dc["lr"], dc["warmup_steps"], dc["steps"], "constant")',
           'lr = lr_at(step + 1, dc["lr"], dc["warmup_steps"], dc["steps"], "constant")',
           (BOOK, "-k", "dit_loop_lr"), "DiT loop: the schedule one step ahead"),
    Mutant("dit_ema_inverted", "dinosae/train/dit.py",
           'ema_update(ema, model, dc["ema"])',
           'ema_update(ema, model, 1 - dc["ema"])',
           (BOOK, "-k", "dit_loop_lr"), "DiT loop: EMA decay inverted"),
    Mutant("warmup_off_by_one", "dinosae/train/loop.py",
           "return base * (step + 1) / warmup",
           "return base * step / warmup",
           (BOOK, "-k", "schedule"), "lr_at: warm-up starts at 0 (off by one)"),
    Mutant("cosine_without_floor", "dinosae/train/loop.py",
           "return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))",
           "return base * 0.5 * (1.0 + math.cos(math.pi * progress))",
           (BOOK, "-k", "schedule"), "lr_at: cosine to 0 instead of 10%"),
    Mutant("ema_inverted", "dinosae/train/loop.py",
           "torch._foreach_lerp_(e, p, 1.0 - decay)",
           "torch._foreach_lerp_(e, p, decay)",
           (BOOK, "-k", "ema_update"), "ema_update: decay on the model, 1 - decay on the EMA"),
    Mutant("ae_lr_ignores_disc_warmup", "dinosae/train/ae.py",
           'lr = lr_at(step - warmup_d, mine["lr"]',
           'lr = lr_at(step, mine["lr"]',
           (BOOK, "-k", "ae_loop"), "AE loop: generator schedule not offset by D warm-up"),
    Mutant("ae_decoder_ema_inverted", "dinosae/train/ae.py",
           'ema_update(st.ema.decoder, st.ae.decoder, tcfg["ema"])',
           'ema_update(st.ema.decoder, st.ae.decoder, 1 - tcfg["ema"])',
           (BOOK, "-k", "ae_loop"), "AE loop: decoder EMA decay inverted"),
    # ---- the autoencoder's losses
    Mutant("lpips_dropped", "dinosae/train/ae.py",
           'rec_loss = weights["l1"] * l1 + weights["lpips"] * lp',
           'rec_loss = weights["l1"] * l1',
           (AEL, "-k", "weighted_sum"), "generator loss: LPIPS dropped"),
    Mutant("lpips_wrong_pair", "dinosae/train/ae.py",
           "lp = st.lpips(rec.float(), x).mean()",
           "lp = st.lpips(x, x).mean()",
           (AEL, "-k", "weighted_sum"), "generator loss: LPIPS of the input with itself"),
    Mutant("align_unweighted", "dinosae/train/ae.py",
           'loss = loss + weights["align"] * align',
           "loss = loss + align",
           (AEL, "-k", "weighted_sum"), "generator loss: alignment weight ignored"),
    # (lambda from the total loss instead is an equivalent mutant: the alignment term does not
    # reach the decoder's last layer, so both gradients there are the same)
    Mutant("adaptive_weight_of_l1", "dinosae/train/ae.py",
           "lam = adaptive_weight(rec_loss, g_gan,",
           "lam = adaptive_weight(l1, g_gan,",
           (AEL, "-k", "weighted_sum"), "lambda from L1 alone, not the reconstruction loss"),
    Mutant("adv_unweighted", "dinosae/train/ae.py",
           'loss = loss + weights["adv"] * lam * g_gan',
           "loss = loss + lam * g_gan",
           (AEL, "-k", "weighted_sum"), "generator loss: adv weight ignored"),
    Mutant("hinge_swapped", "dinosae/train/ae.py",
           "d_hinge_loss(d_real, d_fake)",
           "d_hinge_loss(d_fake, d_real)",
           (AEL, "-k", "hinge"), "discriminator step: real and fake swapped"),
    Mutant("hinge_fake_sign", "dinosae/models/discriminator.py",
           "F.relu(1.0 + logits_fake).mean()",
           "F.relu(1.0 - logits_fake).mean()",
           (AEL, "-k", "hinge"), "d_hinge_loss: fakes pushed up"),
    Mutant("dino_d_loss_unhalved", "dinosae/models/discriminator.py",
           'D_LOSS_FACTOR = {"teacher": 1.0, "dino_vits8": 0.5}',
           'D_LOSS_FACTOR = {"teacher": 1.0, "dino_vits8": 1.0}',
           (AEL, "-k", "dino_discriminator_step"), "RAE's discriminator: hinge not halved"),
    Mutant("dino_fakes_unquantised", "dinosae/train/ae.py",
           'return quantize(rec.detach()) if backbone == "dino_vits8" else rec.detach()',
           "return rec.detach()",
           (AEL, "-k", "dino_discriminator_step"), "RAE's discriminator: fakes not 8-bit"),
    # ---- the metrics
    Mutant("teacher_unnormalised", "dinosae/evaluate.py",
           "x = (x - self.mean) / self.std",
           "x = x - self.mean",
           (MET, "-k", "teacher_extractor"), "teacher extractor: no division by std"),
    Mutant("teacher_pooled_is_cls", "dinosae/evaluate.py",
           'feats["pooled"] = self.teacher.forward_head(tokens, pre_logits=True)',
           'feats["pooled"] = tokens[:, 0]',
           (MET, "-k", "teacher_extractor"), "teacher extractor: pooled = the CLS token"),
    Mutant("ssim_wrong_pair", "dinosae/evaluate.py",
           "ssims += [ssim(a, b) for a, b in zip(batch, rec_np, strict=True)]",
           "ssims += [ssim(a, b) for a, b in zip(batch, rec_np[::-1], strict=True)]",
           (MET, "-k", "eval_recon"), "eval_recon: SSIM against another image's reconstruction"),
    Mutant("rfd_one_covariance", "dinosae/evaluate.py",
           "rfd = frechet_distance(mu_f, sigma_f, mu_r, sigma_r)",
           "rfd = frechet_distance(mu_f, sigma_f, mu_r, sigma_f)",
           (MET, "-k", "eval_recon"), "eval_recon: rFD with one covariance twice"),
    # ---- the samples file
    Mutant("samples_interval_dropped", "dinosae/generate.py",
           'guidance_interval=tuple(sc["guidance_interval"]), z1=z1,',
           "guidance_interval=(0.0, 1.0), z1=z1,",
           (MET, "-k", "samples_file"), "sample_to_h5: the guidance interval not passed"),
    Mutant("samples_no_guidance", "dinosae/generate.py",
           'z = sample(model, y, cfg_scale=float(sc["cfg_scale"]),',
           "z = sample(model, y, cfg_scale=1.0,",
           (MET, "-k", "samples_file"), "sample_to_h5: the guidance scale not passed"),
    Mutant("samples_labels_zero", "dinosae/generate.py",
           "y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)",
           "y = torch.zeros(len(labels), dtype=torch.long, device=device)",
           (MET, "-k", "samples_file"), "decoded_samples: every sample drawn as class 0"),
    Mutant("seed_fold_dropped", "dinosae/generate.py",
           "return (seed ^ ((seed >> 32) * 0x9E3779B1)) & 0xFFFFFFFF",
           "return seed & 0xFFFFFFFF",
           ("tests/test_generate.py", "-k", "config_seed"),
           "start_noise: the config seed dropped by torch's 32-bit CPU seeding"),
    Mutant("sampler_interval_ignored", "dinosae/rfm.py",
           "guide = cfg_scale != 1.0 and lo <= t <= hi",
           "guide = cfg_scale != 1.0",
           (MET, "-k", "samples_file"), "rfm.sample: guidance at every step"),
    # ---- the security guards
    Mutant("weights_only_false", "dinosae/checkpoint.py",
           "weights_only=True, mmap=mmap",
           "weights_only=False, mmap=mmap",
           (GRD, "-k", "weights_only or holding_code"), "load_checkpoint unpickles code"),
    Mutant("member_name_search", "dinosae/data/shard.py",
           "m = MEMBER_NAME.fullmatch(name)",
           "m = MEMBER_NAME.search(name)",
           (GRD, "-k", "tar_members"), "tar members: any name containing NNNNNNNN.cls"),
    Mutant("member_links_accepted", "dinosae/data/shard.py",
           "if not member.isfile():",
           "if not (member.isfile() or member.issym() or member.islnk()):",
           (GRD, "-k", "tar_members"), "tar members: links accepted by iter_shard"),
    Mutant("loader_prefix_accepted", "dinosae/data/loader.py",
           'or header[345:500].strip(b"\\0")):',
           "):",
           (GRD, "-k", "tar_members"), "loader: a ustar path prefix accepted"),
    Mutant("manifest_name_unchecked", "dinosae/data/shard.py",
           'if not SHARD_NAME.fullmatch(str(s["name"])):',
           'if not SHARD_NAME.search(str(s["name"])):',
           (GRD, "-k", "manifest"), "read_manifest: shard names with folders accepted"),
    # ---- world-size invariance: what a sample draws and where its rows come from
    Mutant("dit_draws_per_rank", "dinosae/train/dit.py",
           "row_generators((seed, step), rows, z0.device)",
           "row_generators((seed, step), range(len(z0)), z0.device)",
           (WS, "-k", "dit_draws"), "DiT: a process's rows drawn as rows 0..b-1 (rank-dependent)"),
    Mutant("diffaug_rows_per_rank", "dinosae/train/ae.py",
           "idx = torch.arange(rows.start, rows.stop, device=gen.device)",
           "idx = torch.arange(0, rows.stop - rows.start, device=gen.device)",
           (WS, "-k", "diffaug_of_a_sample"), "AE: a process augments with rows 0..b-1's draws"),
    Mutant("latent_rows_per_rank", "dinosae/latents/reader.py",
           "rng = np.random.default_rng([seed, epoch, 0, 1])",
           "rng = np.random.default_rng([seed, epoch, rank, 1])",
           (WS, "-k", "latent_batches"), "latent reader: each rank shuffles its windows alike"),
    Mutant("image_order_per_rank", "dinosae/data/loader.py",
           "order = np.random.default_rng([self.seed, self.epoch]).permutation(n)",
           "order = np.random.default_rng([self.seed, self.epoch, self.rank]).permutation(n)",
           (WS, "-k", "image_loader"), "image loader: each rank its own permutation"),
    # ---- what sampling costs and the gFID proxy's sampler
    Mutant("plan_sampling_bf16", "dinosae/plan_measure.py",
           'return "bf16" if precision == "bf16" else "fp32"',
           'return "bf16"',
           ("tests/test_plan.py", "-k", "forward_flops"),
           "plan: the sampler priced at bf16 whatever sample.precision says"),
    Mutant("proxy_sample_precision", "dinosae/train/proxy.py",
           'self.sc = {**cfg["sample"], "precision": cfg["dit"].get("eval_precision", "bf16")}',
           'self.sc = cfg["sample"]',
           ("tests/test_logs.py", "-k", "gfid_proxy_equals"),
           "gFID proxy: samples at sample.precision, not dit.eval_precision"),
]


def repo_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def make_copy(root: Path, dest: Path) -> Path:
    """The repository's files (tracked or trackable, no .git) under dest/repo."""
    repo = dest / "repo"
    for f in repo_files(root):
        target = repo / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, target)
    return repo


PYTEST_ARGS = ("-x", "-q", "-n", "0", "-p", "no:cacheprovider", "-m", "not integration")
# imported once by the parent in --fork mode, so that each mutant's process starts with them
PRELOAD = ("numpy", "scipy.stats", "torch", "timm", "lpips", "h5py", "PIL.Image", "yaml",
           "torch_fidelity", "skimage.metrics", "webdataset", "zarr", "pytest")


def _env(repo: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("CI", None)  # a mutant's tests skip what they cannot run here; they never fail for it
    return env


def _forked_pytest(repo: str, tests: tuple[str, ...], log: str) -> None:
    """In a forked child of a parent that imported torch & co but never dinosae: run pytest on
    the copy `repo` (its dinosae first on sys.path), output to `log`, exit with pytest's code."""
    rc = 3
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(repo)
        os.environ.clear()
        os.environ.update(_env(Path(repo)))
        # the worktree's own code leaves sys.path; a virtualenv inside it (.venv) stays
        sys.path[:] = [repo] + [p for p in sys.path if p and (
            not p.startswith(str(ROOT)) or p.startswith(sys.prefix))]
        for name in [n for n in sys.modules if n == "dinosae" or n.startswith("dinosae.")]:
            del sys.modules[name]
        import pytest

        rc = int(pytest.main([*PYTEST_ARGS, *tests]))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


class Run:
    """One pytest run on a copy: a forked child (fork=True) or a fresh interpreter."""

    def __init__(self, repo: Path, tests: tuple[str, ...], fork: bool) -> None:
        self.log = repo.parent / "pytest.log"
        self.t0 = time.time()
        if fork:
            import multiprocessing

            self.proc = multiprocessing.get_context("fork").Process(
                target=_forked_pytest, args=(str(repo), tests, str(self.log)))
            self.proc.start()
            self.popen = None
        else:
            self.proc = None
            with open(self.log, "w") as out:
                self.popen = subprocess.Popen([sys.executable, "-m", "pytest", *PYTEST_ARGS,
                                               *tests], cwd=repo, env=_env(repo), stdout=out,
                                              stderr=subprocess.STDOUT)

    def poll(self) -> int | None:
        return self.popen.poll() if self.popen is not None else self.proc.exitcode

    def kill(self) -> None:
        (self.popen or self.proc).kill()

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines() \
            if self.log.exists() else []
        return lines[-1] if lines else ""


def prepare(base: Path, m: Mutant) -> tuple[Path, dict, str | None]:
    """(work folder, table row, a final result when the mutant cannot run). The copy is
    private: hard links for everything, a real file for the mutated one."""
    work = Path(tempfile.mkdtemp(prefix=f"{m.name}-", dir=base.parent))
    repo = work / "repo"
    shutil.copytree(base, repo, copy_function=os.link)
    row = {"name": m.name, "file": m.file, "why": m.why, "tests": " ".join(m.tests),
           "seconds": 0.0, "tail": ""}
    path = repo / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        return work, row, f"stale ({count} matches)"
    path.unlink()  # break the hard link before writing
    path.write_text(text.replace(m.old, m.new))
    compiled = subprocess.run([sys.executable, "-m", "py_compile", str(path)],
                              capture_output=True, text=True)
    if compiled.returncode != 0:
        row["tail"] = compiled.stderr.strip()[-200:]
        return work, row, "invalid (does not compile)"
    return work, row, None


RESULTS = {0: "MISSED", 1: "caught"}


def run_all(base: Path, mutants: list[Mutant], jobs: int, timeout: float, fork: bool
            ) -> list[dict]:
    """Every mutant, up to `jobs` at once (processes started from this, the main, thread)."""
    pending, running, done = list(mutants), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            m = pending.pop(0)
            work, row, final = prepare(base, m)
            if final is not None:
                done[m.name] = {**row, "result": final}
                shutil.rmtree(work, ignore_errors=True)
                continue
            running[m.name] = (Run(work / "repo", m.tests, fork), work, row)
        for name, (run, work, row) in list(running.items()):
            rc, secs = run.poll(), time.time() - run.t0
            if rc is None and secs > timeout:
                run.kill()
                rc = -1
            if rc is None:
                continue
            result = RESULTS.get(rc, "timeout" if rc == -1 else f"error (exit {rc})")
            done[name] = {**row, "result": result, "seconds": secs, "tail": run.tail()}
            print(f"  {name}: {result} ({secs:.0f} s) {done[name]['tail']}", file=sys.stderr,
                  flush=True)
            shutil.rmtree(work, ignore_errors=True)
            del running[name]
        time.sleep(0.2)
    return [done[m.name] for m in mutants]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="mutants checked at once")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    ap.add_argument("--no-fork", dest="fork", action="store_false",
                    help="a fresh interpreter per mutant (default: a fork of this process with "
                         "torch, timm, ... already imported, not dinosae)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the run of every named test on the unmutated copy")
    args = ap.parse_args()

    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or []) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutants: {sorted(unknown)}")
    os.environ["OMP_NUM_THREADS"] = "1"
    if args.list:
        for m in mutants:
            print(f"{m.name:28s} {m.file:32s} {' '.join(m.tests)}\n{'':28s} {m.why}")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="dinosae-mutate-"))
    try:
        base = make_copy(ROOT, tmp)
        t0 = time.time()
        if args.fork:
            for name in PRELOAD:
                try:
                    __import__(name)
                except ImportError:
                    pass
            import torch

            torch.set_num_threads(1)
        if not args.no_baseline:
            files = tuple(sorted({t for m in mutants for t in m.tests
                                  if t.startswith("tests/")}))
            work = Path(tempfile.mkdtemp(prefix="baseline-", dir=tmp))
            shutil.copytree(base, work / "repo", copy_function=os.link)
            run = Run(work / "repo", files, args.fork)
            while run.poll() is None:
                time.sleep(0.5)
            print(f"baseline: {' '.join(files)}: exit {run.poll()} ({run.tail()}) in "
                  f"{time.time() - run.t0:.0f} s", flush=True)
            if run.poll() != 0:
                print("the tests fail without any mutant: fix that first", file=sys.stderr)
                return 2
        rows = run_all(base, mutants, max(1, args.jobs), args.timeout, args.fork)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n| mutant | file | bug | tests | result | s |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['file']} | {r['why']} | `{r['tests']}` | {r['result']} | "
              f"{r['seconds']:.0f} |")
    caught = sum(r["result"] == "caught" for r in rows)
    print(f"\n{caught}/{len(rows)} caught in {time.time() - t0:.0f} s")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
