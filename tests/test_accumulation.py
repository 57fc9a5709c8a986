"""Gradient accumulation: k micro-batches give the update of one batch of k times the size
(fp32 on CPU, within 1e-6 relative on the updated weights), for the DiT and the autoencoder
stages (generator with its adaptive GAN weight, and discriminator). The reference is the
ordinary one-batch step, code that does not accumulate."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import ae_stages, tiny_config
from test_dit import FakeCache

from dinosae.checkpoint import load_checkpoint
from dinosae.train import dit as TD
from dinosae.train.ae import train_stage

pytestmark = pytest.mark.usefixtures("one_thread")


def max_rel_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all floating tensors of two state dicts as one vector (per tensor,
    Adam turns fp32 rounding into 1e-6 on the near-zero tensors (zero-initialised biases) after a
    few steps; on the whole weights it stays near 1e-8)."""
    assert a.keys() == b.keys()
    keys = [k for k in b if b[k].is_floating_point()]
    va = torch.cat([a[k].double().flatten() for k in keys])
    vb = torch.cat([b[k].double().flatten() for k in keys])
    return float((va - vb).norm() / vb.norm())


# ---------------------------------------------------------------- DiT

def test_dit_micro_batches_equal_one_batch(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["device"] = "cpu"
    cfg["dit"].update(steps=4, batch_size=8, ckpt_every=100, log_every=2, image_every=100,
                      warmup_steps=1, grad_clip=1e6)  # no clipping: its norm is the check
    cfg = {k: cfg[k] for k in ("seed", "device", "dit", "sample")}
    ref = load_checkpoint(TD.train_dit(cfg, FakeCache(), None, tmp_path / "ref"))
    acc_cfg = copy.deepcopy(cfg)
    acc_cfg["dit"]["micro_batch"] = 3  # 3 + 3 + 2 rows
    acc = load_checkpoint(TD.train_dit(acc_cfg, FakeCache(), None, tmp_path / "acc"))
    assert max_rel_diff(acc["model"], ref["model"]) < 1e-6
    assert max_rel_diff(acc["ema"], ref["ema"]) < 1e-6
    moved = max_rel_diff(ref["model"], load_checkpoint(TD.train_dit(
        {**cfg, "dit": {**cfg["dit"], "steps": 1}}, FakeCache(), None, tmp_path / "one"))["model"])
    assert moved > 1e-4  # the steps after the first changed the weights: a real comparison


def test_dit_train_step_reports_whole_batch_losses_and_clips_alike():
    torch.manual_seed(0)
    from test_dit import _fresh_model_and_opt, _step_inputs

    results = []
    for micro in (None, 2):
        model, opt = _fresh_model_and_opt()
        rs = [TD.train_step(model, opt, z0, z1, t, y, r=4.0, path="rfm", lambda_rad=0.1,
                            grad_clip=0.05, micro_batch=micro)
              for z0, z1, t, y in _step_inputs(3, 8, 4, 16, 3, 4.0)]
        results.append((rs, model.state_dict()))
    (one, w_one), (acc, w_acc) = results
    for a, b in zip(acc, one, strict=True):
        assert b["grad_norm"] > 0.05  # clipping is active
        for key in ("loss", "loss_tan", "loss_rad", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    assert max_rel_diff(w_acc, w_one) < 1e-6


# ---------------------------------------------------------------- autoencoder stages

def ae_config(micro: int | None) -> dict:
    cfg = tiny_config()
    cfg["device"] = "cpu"
    cfg["autoencoder"]["lpips"]["net"] = "alex"
    cfg["ae_train"].update(stages=ae_stages([2, 3, 2, 2], 4, cfg["ae_train"]["stages"][0]["lr"]),
                           disc_warmup_steps=1,
                           log_every=1, image_every=100, ckpt_every=100, micro_batch=micro,
                           noise_tau=[0.5, 0.8])
    return cfg


def batches(epoch: int):
    g = torch.Generator().manual_seed(epoch)
    data = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    order = torch.randperm(8, generator=g)
    for i in (0, 4):
        yield data[order[i:i + 4]], torch.zeros(4, dtype=torch.long)


def _one_step(cfg: dict, stage: int, init: str | None, micro: int | None,
              rows: range | None = None, total: int | None = None) -> dict:
    """One generator and one discriminator step of `stage` on one batch (with `rows`: those
    rows of it, as the process holding them in a global batch of `total` would); the gradients
    each optimizer saw (= the update plain SGD with lr 1 would make) and the metrics row."""
    from contextlib import nullcontext

    from dinosae.train import ae as A

    st = A.build_stage(cfg, stage, init, torch.device("cpu"))
    seen = {}
    weights = {"g": torch.cat([p.detach().flatten() for p in st.params])}
    if st.disc is not None:
        trained = st.d_opt.param_groups[0]["params"]  # not a frozen DINO backbone
        weights["d"] = torch.cat([p.detach().flatten() for p in trained])
    st.opt.step = lambda: seen.update(g=torch.cat([p.grad.flatten() for p in st.params]))
    if st.d_opt is not None:
        st.d_opt.step = lambda: seen.update(d=torch.cat([p.grad.flatten() for p in trained]))
    x = next(batches(0))[0]
    if rows is not None:
        x = x[rows.start:rows.stop]
    gen = A.step_generator(5, stage, 0, torch.device("cpu"))
    noise = None
    if stage == 4:
        noise, _ = A._noise(st, x, 0, 2, [0.5, 0.8], (5, stage, 0),
                            range(len(x)) if rows is None else rows)
    kw = {"tcfg": cfg["ae_train"], "autocast": nullcontext(), "device": torch.device("cpu"),
          "micro_batch": micro, "rows": rows, "total": total}
    row, rec, ok = A.generator_step(st, st.ae, x, noise, gen, train_g=True, lr=1e-4, **kw)
    assert ok
    if st.disc is not None:
        d_row, ok = A.discriminator_step(st, st.disc, x, rec, gen, d_lr=1e-4, **kw)
        assert ok
        row.update(d_row)
    return {"grads": seen, "weights": weights,
            "row": {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in row.items()}}


def test_ae_step_micro_batches_give_the_whole_batch_gradients(tmp_path):
    """Stage 1 (alignment) and stage 2 (adaptive GAN weight on the summed gradients, DiffAugment
    and the spectral-norm power iteration as for the whole batch; the discriminator's hinge
    loss): micro-batches of 3 + 1 and 1 + 1 + 1 + 1 rows against the batch of 4."""
    cfg = ae_config(None)
    train_stage(cfg, 1, None, out=str(tmp_path / "s1"), batches=batches)
    init = str(tmp_path / "s1" / "checkpoint.pt")
    for stage, start in ((1, None), (2, init)):
        ref = _one_step(cfg, stage, start, None)
        assert set(ref["grads"]) == ({"g"} if stage == 1 else {"g", "d"})
        for micro in (3, 1):
            acc = _one_step(cfg, stage, start, micro)
            for key, g in ref["grads"].items():
                # the gradients to fp32 rounding (4 parts: 1.3e-6), and so the weights that an
                # update of lr 1e-3 makes to 1e-6 relative
                rel = float((acc["grads"][key] - g).norm() / g.norm())
                assert rel < 1e-5, (stage, micro, key, rel)
                w = ref["weights"][key]
                assert float(((w - 1e-3 * acc["grads"][key]) - (w - 1e-3 * g)).norm()
                             / (w - 1e-3 * g).norm()) < 1e-6
            assert acc["row"].keys() == ref["row"].keys()
            for key, v in ref["row"].items():
                assert acc["row"][key] == pytest.approx(v, rel=1e-5, nan_ok=True), key


@pytest.mark.integration
def test_ae_stages_micro_batches_equal_one_batch(tmp_path):
    """The loop through the four stages (stage 2: discriminator warm-up, then generator and
    discriminator; stage 4: latent noise) with micro-batches of 3 + 1 rows against the whole
    batch of 4, each stage from the reference's previous checkpoint: the same weights after
    AdamW steps."""
    init = None
    for stage in (1, 2, 3, 4):
        out = {}
        for name, micro in (("ref", None), ("acc", 3)):
            folder = tmp_path / f"{name}{stage}"
            train_stage(ae_config(micro), stage, None, init=init, out=str(folder),
                        batches=batches)
            out[name] = load_checkpoint(folder / "checkpoint.pt")
        for key in ("model", "ema"):
            assert max_rel_diff(out["acc"][key], out["ref"][key]) < 1e-6, (stage, key)
        if stage >= 2:  # the heads have dead channels: bias gradients of 1e-9, fp32 rounding,
            # which Adam (eps 1e-8) turns into updates of lr/3, differing; their gradients are
            # equal to 1e-7 (the test above)
            assert max_rel_diff(out["acc"]["disc"], out["ref"]["disc"]) < 1e-4, stage
        if init is not None:  # the stage changed the weights it trains
            before = load_checkpoint(init)
            assert max_rel_diff(out["ref"]["model"], before["model"]) > 1e-4
            if stage >= 3:
                assert max_rel_diff(out["ref"]["disc"], before["disc"]) > 1e-4
        init = str(tmp_path / f"ref{stage}" / "checkpoint.pt")


@pytest.mark.integration  # ~80 s on one CPU core: RAE's ViT-S/8 at 224 px, forward and back
def test_ae_step_dino_discriminator_micro_batches_give_the_whole_batch_gradients(tmp_path):
    """RAE's discriminator (backbone dino_vits8: RAE's DiffAug, fakes quantised, half hinge loss,
    eval-mode discriminator in the generator step) accumulates too: its norm (RAE's
    BatchNormLocal with virtual batch 1) is per sample, so parts of 3 + 1 rows give the
    gradients of the batch of 4 -- and so those of 4 processes of one row each."""
    cfg = ae_config(None)
    cfg["autoencoder"]["discriminator"] = {"backbone": "dino_vits8", "weights": "random"}
    train_stage(cfg, 1, None, out=str(tmp_path / "s1"), batches=batches)
    init = str(tmp_path / "s1" / "checkpoint.pt")
    ref = _one_step(cfg, 2, init, None)
    acc = _one_step(cfg, 2, init, 3)
    assert set(ref["grads"]) == {"g", "d"}
    for key, g in ref["grads"].items():
        rel = float((acc["grads"][key] - g).norm() / g.norm())
        assert rel < 1e-5, (key, rel)
    for key, v in ref["row"].items():
        assert acc["row"][key] == pytest.approx(v, rel=1e-5, nan_ok=True), key


def test_ae_step_on_two_processes_rows_is_the_whole_batch_step(tmp_path):
    """Stage 2 split as two processes would hold it (rows 0-1 and 2-3 of a global batch of 4),
    each drawing through the real step: the discriminator's gradient is the mean of the two
    (what DDP's all-reduce makes of them) and the losses of every row are the whole batch's,
    DiffAugment included (the GAN terms would differ if a process drew its own augmentation).
    The generator's adaptive weight is not a mean over rows: tests/test_multinode.py runs
    that through DDP."""
    cfg = ae_config(None)
    cfg["ae_train"]["grad_clip"] = 1e9  # the gradients as computed (DDP clips the mean)
    train_stage(cfg, 1, None, out=str(tmp_path / "s1"), batches=batches)
    init = str(tmp_path / "s1" / "checkpoint.pt")
    whole = _one_step(cfg, 2, init, None)
    halves = [_one_step(cfg, 2, init, micro, rows=rows, total=4)
              for rows, micro in ((range(0, 2), None), (range(2, 4), 1))]
    d = (halves[0]["grads"]["d"] + halves[1]["grads"]["d"]) / 2
    assert float((d - whole["grads"]["d"]).norm() / whole["grads"]["d"].norm()) < 1e-5
    for key in ("l1", "lpips", "align", "g_gan", "d_loss", "d_real", "d_fake"):
        mean = (halves[0]["row"][key] + halves[1]["row"][key]) / 2
        assert mean == pytest.approx(whole["row"][key], rel=1e-5), key
