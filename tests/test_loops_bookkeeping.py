"""The training loops' bookkeeping against its definitions, not against another run of the same
code: the learning-rate schedule, the EMA, label dropout (rate and null class), the per-step
noise/time draws, and what the DiT and AE loops actually hand to their steps (the learning rate
of every step, fresh draws at every step, the EMA in the final checkpoint recomputed from the
weights after each step)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import ae_stages
from scipy import stats
from test_dit import FakeCache
from test_train_ae import images, make_batches, small_config

from dinosae import rfm
from dinosae.checkpoint import load_checkpoint
from dinosae.train import ae as TA
from dinosae.train import dit as TD
from dinosae.train.loop import ema_update, lr_at

pytestmark = pytest.mark.usefixtures("one_thread")
REAL_DRAW = TD.draw_inputs  # before any test wraps it


# ---------------------------------------------------------------- definitions

def schedule(step: int, base: float, warmup: int, total: int, kind: str) -> float:
    """Linear warm-up to `base` over `warmup` steps ((step+1)/warmup), then constant or a cosine
    from base down to 0.1·base at `total`: the documented schedule, written out."""
    if step < warmup:
        return base * (step + 1) / warmup
    if kind == "constant":
        return base
    p = (step - warmup) / (total - warmup)
    return 0.1 * base + 0.9 * base * (1 + math.cos(math.pi * p)) / 2


def test_lr_schedule_against_definition():
    base, warmup, total = 3e-4, 5, 25
    got = [lr_at(s, base, warmup, total, "cosine") for s in range(total + 1)]
    want = [schedule(s, base, warmup, total, "cosine") for s in range(total + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] == pytest.approx(base / 5) and got[4] == pytest.approx(base)  # warm-up ends
    assert got[5] == pytest.approx(base) and got[15] == pytest.approx(0.55 * base)
    assert got[25] == pytest.approx(0.1 * base)
    const = [lr_at(s, base, warmup, total, "constant") for s in range(total + 1)]
    np.testing.assert_allclose(const, [schedule(s, base, warmup, total, "constant")
                                       for s in range(total + 1)], rtol=1e-12)
    assert lr_at(0, base, 0, total, "cosine") == pytest.approx(base)  # no warm-up


def test_ema_update_against_definition():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(8, 3))  # running statistics move
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update(ema, model, 0.9)
    for name, p in model.named_parameters():
        want = 0.9 * before[name] + 0.1 * p.detach()  # decay on the EMA, 1 - decay on the model
        torch.testing.assert_close(dict(ema.named_parameters())[name], want)
    for name, b in model.named_buffers():
        assert torch.equal(dict(ema.named_buffers())[name], b), name  # buffers copied


# ---------------------------------------------------------------- per-step draws

def test_draw_inputs_label_dropout_rate_and_null_class():
    n, K, p = 20000, 7, 0.1
    y = torch.arange(n) % K
    z0 = torch.randn(n, 1, 4)
    _, _, y_out = TD.draw_inputs(z0, y, torch.Generator().manual_seed(0), r=2.0, alpha=1.0,
                                 path="rfm", label_dropout=p, null_class=K)
    dropped = y_out == K
    # binomial(20000, 0.1): sd 42; 5 sd either side
    assert abs(int(dropped.sum()) - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert torch.equal(y_out[~dropped], y[~dropped])  # the others keep their label
    assert set(y_out.tolist()) <= set(range(K + 1))
    for rate, want in ((0.0, 0), (1.0, n)):
        _, _, y_all = TD.draw_inputs(z0, y, torch.Generator().manual_seed(1), r=2.0, alpha=1.0,
                                     path="rfm", label_dropout=rate, null_class=K)
        assert int((y_all == K).sum()) == want


def test_draw_inputs_time_law_and_noise():
    n, alpha, r = 20000, 4.0, 3.0
    z0 = torch.randn(n, 2, 8)
    z1, t, _ = TD.draw_inputs(z0, torch.zeros(n, dtype=torch.long),
                              torch.Generator().manual_seed(2), r=r, alpha=alpha, path="rfm",
                              label_dropout=0.1, null_class=5)

    def cdf(x):  # t = shift(sigmoid(N(0, 1))), shift(s) = α s / (1 + (α − 1) s)
        s = x / (alpha - (alpha - 1) * x)
        return stats.norm.cdf(np.log(s) - np.log1p(-s))

    assert t.shape == (n,) and stats.kstest(t.double().numpy(), cdf).pvalue > 1e-3
    # noise: radius r, isotropic (mean ~0, coordinates of variance r²/C), independent of z0
    torch.testing.assert_close(z1.norm(dim=-1), torch.full((n, 2), r))
    assert z1.mean(0).abs().max() < 5 * r / math.sqrt(8) / math.sqrt(n)
    assert abs(z1.square().mean().item() - r * r / 8) < 0.02
    assert abs(torch.corrcoef(torch.stack([z0[:, 0, 0], z1[:, 0, 0]]))[0, 1]) < 0.05


# ---------------------------------------------------------------- the DiT loop

def _dit_cfg(tmp_path, **dit):
    from helpers import tiny_config

    cfg = tiny_config(tmp_path)
    cfg["device"] = "cpu"
    cfg["dit"].update({"steps": 6, "batch_size": 8, "ckpt_every": 100, "log_every": 1,
                       "image_every": 100, "warmup_steps": 3, "lr": 2e-3, "ema": 0.7,
                       "label_dropout": 0.25, **dit})
    return {k: cfg[k] for k in ("seed", "device", "dit", "sample")}


def _record_dit_steps(monkeypatch):
    """Wrap train_step and draw_rows (the real ones run) to record each step's inputs, the
    learning rate set on the optimiser, and the weights before and after."""
    steps, draws = [], []
    real_step, real_draw = TD.train_step, TD.draw_rows

    def draw(z0, y, seed, step, rows, **kw):
        out = real_draw(z0, y, seed, step, rows, **kw)
        draws.append({"seed": seed, "step": step, "rows": rows, "z0": z0.clone(),
                      "y_in": y.clone(), "kw": kw, "out": [o.clone() for o in out]})
        return out

    def step(model, opt, z0, z1, t, y, **kw):
        before = [p.detach().clone() for p in model.parameters()]
        res = real_step(model, opt, z0, z1, t, y, **kw)
        steps.append({"lr": opt.param_groups[0]["lr"], "before": before, "ok": res["ok"],
                      "after": [p.detach().clone() for p in model.parameters()], "kw": kw,
                      "z0": z0.clone(), "z1": z1.clone(), "t": t.clone(), "y": y.clone()})
        return res

    monkeypatch.setattr(TD, "train_step", step)
    monkeypatch.setattr(TD, "draw_rows", draw)
    return steps, draws


def test_dit_loop_lr_draws_dropout_and_ema(tmp_path, monkeypatch):
    cfg = _dit_cfg(tmp_path, lambda_rad=0.3)
    dc = cfg["dit"]
    steps, draws = _record_dit_steps(monkeypatch)
    ck = load_checkpoint(TD.train_dit(cfg, FakeCache(), None, tmp_path / "run"))
    assert len(steps) == len(draws) == 6 and all(s["ok"] for s in steps)

    # the learning rate of every step: warm-up over 3 steps, then constant (the DiT's schedule)
    want = [schedule(s, dc["lr"], dc["warmup_steps"], dc["steps"], "constant") for s in range(6)]
    np.testing.assert_allclose([s["lr"] for s in steps], want, rtol=1e-9)

    # the step gets the configured objective and this step's draws
    for s, d in zip(steps, draws, strict=True):
        assert s["kw"]["lambda_rad"] == 0.3 and s["kw"]["path"] == dc["path"]
        assert s["kw"]["r"] == pytest.approx(4.0) and s["kw"]["grad_clip"] == dc["grad_clip"]
        for got, drawn in zip((s["z1"], s["t"], s["y"]), d["out"], strict=True):
            assert torch.equal(got, drawn)
        assert torch.equal(s["z0"], d["z0"])  # data tokens at radius √C
        torch.testing.assert_close(s["z0"].norm(dim=-1), torch.full(s["z0"].shape[:2], 4.0))

    # the draws: each sample's from a generator seeded by (seed, step, its row of the global
    # batch), so each step's noise, times and dropout are new, yet a pure function of the step
    # (and of the row: tests/test_world_size.py)
    keys = [(d["seed"], d["step"], d["rows"]) for d in draws]
    assert keys == [(cfg["seed"], s, range(0, 8)) for s in range(6)]
    for a, b in zip(draws, draws[1:], strict=False):
        assert not torch.allclose(a["out"][0], b["out"][0])  # noise
        assert not torch.allclose(a["out"][1], b["out"][1])  # times
    for d in draws:
        assert d["kw"]["label_dropout"] == dc["label_dropout"]
        assert d["kw"]["null_class"] == 3 and d["kw"]["r"] == pytest.approx(4.0)  # K, √C
        assert d["kw"]["alpha"] == pytest.approx(rfm.alpha_for(4, 16))
        # row j: draw_inputs on that sample alone, from a generator seeded by (seed, step, j)
        again = [REAL_DRAW(d["z0"][i:i + 1], d["y_in"][i:i + 1], torch.Generator().manual_seed(
            TD.sample_seed(d["seed"], d["step"], j)), **d["kw"]) for i, j in enumerate(d["rows"])]
        for x, y in zip((torch.cat(p) for p in zip(*again, strict=True)), d["out"], strict=True):
            assert torch.equal(x, y)
    # over the run, about a quarter of the labels became the null class, the rest kept theirs
    y_in = torch.cat([d["y_in"] for d in draws])
    y_out = torch.cat([d["out"][2] for d in draws])
    null = y_out == 3
    assert 3 <= int(null.sum()) <= 24 and torch.equal(y_out[~null], y_in[~null])

    # the EMA: ema_0 = the initial weights; after each good step ema ← d·ema + (1 − d)·weights
    d = dc["ema"]
    ema = steps[0]["before"]
    for s in steps:
        ema = [d * e + (1 - d) * w for e, w in zip(ema, s["after"], strict=True)]
    names = [n for n, _ in TD.dit_from_config(ck["config"]).named_parameters()]
    for name, e in zip(names, ema, strict=True):
        torch.testing.assert_close(ck["ema"][name], e, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(ck["model"][name], steps[-1]["after"][names.index(name)])


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_dit_loop_label_dropout_reaches_the_network(tmp_path, monkeypatch, rate):
    cfg = _dit_cfg(tmp_path, steps=2, label_dropout=rate, warmup_steps=1)
    seen = []
    real = TD.train_step

    def step(model, opt, z0, z1, t, y, **kw):
        seen.append(y.clone())
        return real(model, opt, z0, z1, t, y, **kw)

    monkeypatch.setattr(TD, "train_step", step)
    cache = FakeCache()
    TD.train_dit(cfg, cache, None, tmp_path / "run")
    y = torch.cat(seen)
    if rate == 1.0:
        assert (y == 3).all()  # every label dropped to the null class K = 3
    else:
        assert (y < 3).all() and len(set(y.tolist())) == 3


# ---------------------------------------------------------------- the AE loop

def test_ae_loop_lr_and_ema(tmp_path, monkeypatch):
    """Stage 2 (discriminator warm-up first): the generator's and discriminator's learning
    rates at every step, and the final EMA of stem and decoder recomputed from the weights after
    each generator update."""
    cfg = small_config()
    tc = cfg["ae_train"]
    lr = 1e-3
    tc.update(stages=ae_stages([2, 5, 3, 3], tc["stages"][0]["batch_size"], lr),
              disc_warmup_steps=1, warmup_steps=2, ema=0.6, disc_lr=5e-4, schedule="cosine",
              ckpt_every=100, image_every=100)
    data = images()
    s1 = tmp_path / "s1"
    TA.train_stage(cfg, 1, None, out=str(s1), batches=make_batches(data, 4))

    g_calls, d_calls = [], []
    real_g, real_d = TA.generator_step, TA.discriminator_step

    def trainable(st):
        return [p.detach().clone() for p in [*st.ae.encoder.stem.parameters(),
                                             *st.ae.decoder.parameters()]]

    def g_step(st, *a, **kw):
        before = trainable(st)
        out = real_g(st, *a, **kw)
        g_calls.append({"lr": kw["lr"], "train_g": kw["train_g"], "ok": out[2],
                        "set": st.opt.param_groups[0]["lr"], "before": before,
                        "after": trainable(st)})
        return out

    def d_step(st, *a, **kw):
        d_calls.append({"lr": kw["d_lr"], "set": None})
        out = real_d(st, *a, **kw)
        d_calls[-1]["set"] = st.d_opt.param_groups[0]["lr"]
        return out

    monkeypatch.setattr(TA, "generator_step", g_step)
    monkeypatch.setattr(TA, "discriminator_step", d_step)
    s2 = tmp_path / "s2"
    TA.train_stage(cfg, 2, None, init=str(s1 / "checkpoint.pt"), out=str(s2),
                   batches=make_batches(data, 4))
    assert len(g_calls) == len(d_calls) == 5

    # generator: nothing during the 1 warm-up step, then the schedule over the 4 steps after it
    assert [c["train_g"] for c in g_calls] == [False, True, True, True, True]
    want_g = [0.0] + [schedule(s, lr, 2, 4, "cosine") for s in range(4)]
    np.testing.assert_allclose([c["lr"] for c in g_calls], want_g, rtol=1e-9, atol=0)
    np.testing.assert_allclose([c["set"] for c in g_calls[1:]], want_g[1:], rtol=1e-9)
    want_d = [schedule(s, tc["disc_lr"], 2, 5, "cosine") for s in range(5)]
    np.testing.assert_allclose([c["lr"] for c in d_calls], want_d, rtol=1e-9)
    np.testing.assert_allclose([c["set"] for c in d_calls], want_d, rtol=1e-9)

    # EMA: stage 1's EMA, then ema ← d·ema + (1 − d)·weights after each generator update
    ck1, ck2 = load_checkpoint(s1 / "checkpoint.pt"), load_checkpoint(s2 / "checkpoint.pt")
    keys = [k for k in ck2["ema"] if k.startswith(("encoder.stem.", "decoder."))]
    names = ([f"encoder.stem.{n}" for n, _ in TA.DinoSAE.from_checkpoint(
        ck2, "s2", weights="model").encoder.stem.named_parameters()]
             + [f"decoder.{n}" for n, _ in TA.DinoSAE.from_checkpoint(
                 ck2, "s2", weights="model").decoder.named_parameters()])
    ema = [ck1["ema"][n].float() for n in names]
    first = zip(g_calls[0]["before"], g_calls[0]["after"], strict=True)
    assert all(torch.equal(a, b) for a, b in first)  # the warm-up step trains no generator
    for c in g_calls[1:]:
        assert c["ok"]
        ema = [tc["ema"] * e + (1 - tc["ema"]) * w for e, w in zip(ema, c["after"], strict=True)]
    moved = 0.0
    for name, e in zip(names, ema, strict=True):
        assert name in keys
        torch.testing.assert_close(ck2["ema"][name].float(), e, rtol=1e-5, atol=1e-6, msg=name)
        moved += float((ck2["ema"][name].float() - ck1["ema"][name].float()).abs().sum())
    assert moved > 0
