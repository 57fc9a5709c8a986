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
per mutant, ~10-30 s each on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
           "gen.manual_seed(step_seed(seed, rank, step))",
           "gen.manual_seed(step_seed(seed, rank, 0))",
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
           'lr = lr_at(step - warmup_d, tcfg["lr"]',
           'lr = lr_at(step, tcfg["lr"]',
           (BOOK, "-k", "ae_loop"), "AE loop: generator schedule not offset by D warm-up"),
    Mutant("ae_decoder_ema_inverted", "dinosae/train/ae.py",
           'ema_update(st.ema.decoder, ae.decoder, tcfg["ema"])',
           'ema_update(st.ema.decoder, ae.decoder, 1 - tcfg["ema"])',
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
    Mutant("adaptive_weight_of_total", "dinosae/train/ae.py",
           "lam = adaptive_weight(rec_loss, g_gan,",
           "lam = adaptive_weight(loss, g_gan,",
           (AEL, "-k", "weighted_sum"), "lambda from the total loss, not the reconstruction"),
    Mutant("adv_unweighted", "dinosae/train/ae.py",
           'loss = loss + weights["adv"] * lam * g_gan',
           "loss = loss + lam * g_gan",
           (AEL, "-k", "weighted_sum"), "generator loss: adv weight ignored"),
    Mutant("hinge_swapped", "dinosae/train/ae.py",
           "d_loss = d_hinge_loss(d_real, d_fake)",
           "d_loss = d_hinge_loss(d_fake, d_real)",
           (AEL, "-k", "hinge"), "discriminator step: real and fake swapped"),
    Mutant("hinge_fake_sign", "dinosae/models/discriminator.py",
           "F.relu(1.0 + logits_fake).mean()",
           "F.relu(1.0 - logits_fake).mean()",
           (AEL, "-k", "hinge"), "d_hinge_loss: fakes pushed up"),
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
           "y = torch.from_numpy(labels[lo:hi]).to(device)",
           "y = torch.zeros(hi - lo, dtype=torch.long, device=device)",
           (MET, "-k", "samples_file"), "sample_to_h5: every sample drawn as class 0"),
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


def pytest_cmd(tests: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
            "-m", "not integration", *tests]


def run_tests(repo: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("CI", None)
    t0 = time.time()
    try:
        r = subprocess.run(pytest_cmd(tests), cwd=repo, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout", time.time() - t0
    tail = (r.stdout + r.stderr).strip().splitlines()
    return r.returncode, tail[-1] if tail else "", time.time() - t0


def check_mutant(base: Path, m: Mutant, timeout: float) -> dict:
    """Apply m to a private copy of the one file (the repo copy is shared between workers: a
    per-mutant overlay folder holds the mutated package), run its tests."""
    work = Path(tempfile.mkdtemp(prefix=f"{m.name}-", dir=base.parent))
    repo = work / "repo"
    # a cheap private copy: hard links for everything, a real copy of the mutated file
    shutil.copytree(base, repo, copy_function=os.link)
    path = repo / m.file
    text = path.read_text()
    count = text.count(m.old)
    row = {"name": m.name, "file": m.file, "why": m.why, "tests": " ".join(m.tests)}
    try:
        if count != 1:
            return {**row, "result": f"stale ({count} matches)", "seconds": 0.0, "tail": ""}
        path.unlink()  # break the hard link before writing
        path.write_text(text.replace(m.old, m.new))
        compiled = subprocess.run([sys.executable, "-m", "py_compile", str(path)],
                                  capture_output=True, text=True)
        if compiled.returncode != 0:
            return {**row, "result": "invalid (does not compile)", "seconds": 0.0,
                    "tail": compiled.stderr.strip()[-200:]}
        rc, tail, secs = run_tests(repo, m.tests, timeout)
        result = {0: "MISSED", 1: "caught", -1: "timeout"}.get(rc, f"error (exit {rc})")
        return {**row, "result": result, "seconds": secs, "tail": tail}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="mutants checked at once")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the run of every named test on the unmutated copy")
    args = ap.parse_args()

    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or []) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutants: {sorted(unknown)}")
    if args.list:
        for m in mutants:
            print(f"{m.name:28s} {m.file:32s} {' '.join(m.tests)}\n{'':28s} {m.why}")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="dinosae-mutate-"))
    try:
        base = make_copy(ROOT, tmp)
        t0 = time.time()
        if not args.no_baseline:
            files = tuple(sorted({t for m in mutants for t in m.tests
                                  if t.startswith("tests/")}))
            rc, tail, secs = run_tests(base, files, args.timeout)
            print(f"baseline: {' '.join(files)}: exit {rc} ({tail}) in {secs:.0f} s", flush=True)
            if rc != 0:
                print("the tests fail without any mutant: fix that first", file=sys.stderr)
                return 2
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            rows = []
            for row in pool.map(lambda m: check_mutant(base, m, args.timeout), mutants):
                print(f"  {row['name']}: {row['result']} ({row['seconds']:.0f} s) {row['tail']}",
                      file=sys.stderr, flush=True)
                rows.append(row)
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
