"""LightningDiT / DiTDH (parity with the reference code: test_dit_parity.py) and the DiT training
loop: shapes, adaLN-zero, RoPE, sin-cos positions, time embeddings, attention vs a manual
softmax, DDP (2 gloo processes) vs one process, resume after a kill / SIGTERM, non-finite
steps, checkpoints."""

from __future__ import annotations

import copy
import csv
import math
import os
import signal
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import tiny_config

from dinosae.checkpoint import load_checkpoint
from dinosae.models import dit as D
from dinosae.models.autoencoder import DinoSAE
from dinosae.models.dit import load_dit
from dinosae.train import dit as TD


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops on a shared 2-core machine run several times faster on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- model

def _inputs(B, T, C, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, C, generator=g), torch.rand(B, generator=g),
            torch.randint(0, K + 1, (B,), generator=g))


@pytest.mark.parametrize("head", [None, {"depth": 2, "width": 256}])
def test_shapes_and_zero_output_at_init(head):
    torch.manual_seed(0)
    model = D.build_dit("tiny", 12, 32, 5, (3, 4), head=head)
    assert model.num_classes == 5
    x, t, y = _inputs(3, 12, 32, 5)
    out = model(x, t, y)
    assert out.shape == (3, 12, 32)
    assert torch.count_nonzero(out) == 0  # adaLN-zero: zero final projection
    # after one optimiser step the output depends on the input
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x, t, y).sub(torch.randn(3, 12, 32)).square().mean().backward()
    opt.step()
    out = model(x, t, y)
    assert out.abs().sum() > 0 and not torch.allclose(out[0], out[1])


def test_blocks_are_identity_at_init():
    """With the final layer made non-zero, the network at init equals the same network with
    no blocks at all (every block's gates start at zero)."""
    torch.manual_seed(0)
    model = D.build_dit("tiny", 16, 32, 4, (4, 4))
    torch.nn.init.normal_(model.final_layer.linear.weight)
    torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight)
    x, t, y = _inputs(2, 16, 32, 4)
    shallow = copy.deepcopy(model)
    shallow.blocks = torch.nn.ModuleList()
    full = model(x, t, y)
    assert full.abs().sum() > 0
    torch.testing.assert_close(full, shallow(x, t, y))
    # and once a gate opens, the blocks matter
    torch.nn.init.normal_(model.blocks[0].adaLN_modulation[-1].weight)
    assert not torch.allclose(model(x, t, y), shallow(x, t, y))


def test_sizes_follow_dit():
    # DiT's table: hidden, depth, heads; XL parameter count ≈ DiT-XL/2's 675M (SwiGLU at 2/3
    # width has the same weights as a GELU MLP; in/out layers differ slightly)
    assert D.SIZES["S"] == (384, 12, 6) and D.SIZES["B"] == (768, 12, 12)
    assert D.SIZES["L"] == (1024, 24, 16) and D.SIZES["XL"] == (1152, 28, 16)
    with torch.device("meta"):
        xl = D.build_dit("XL", 256, 1024, 1000, (16, 16))
    n = sum(p.numel() for p in xl.parameters())
    assert abs(n - 675e6) / 675e6 < 0.02, n
    with pytest.raises(ValueError, match="grid"):
        D.build_dit("tiny", 15, 32, 4, (4, 4))
    with pytest.raises(ValueError, match="unknown DiT size"):
        D.build_dit("XXL", 16, 32, 4, (4, 4))


def test_dit_args_read_the_network_from_a_checkpoint_config():
    """A checkpoint's config holds training settings too; DiTArgs takes what fixes the network,
    with the switches' defaults for a config written before they existed."""
    config = {"dit": {"model": "tiny", "head": {"depth": 1, "width": 96}, "qk_norm": True,
                      "lr": 1e-4, "steps": 7}, "tokens": 4, "channels": 16, "num_classes": 3,
              "grid": [2, 2], "radius": 4.0, "alpha": 1.0}
    args = D.DiTArgs.from_config(config)
    assert args == D.DiTArgs("tiny", {"depth": 1, "width": 96}, 4, 16, 3, (2, 2), qk_norm=True,
                             pos_embed=True, time_embed="fourier")
    net, ref = args.build(), D.build_dit("tiny", 4, 16, 3, (2, 2), {"depth": 1, "width": 96},
                                         qk_norm=True)
    assert isinstance(net, D.DiTDH) and net.blocks[0].attn.qk_norm
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()}
    old = {**config, "dit": {"model": "tiny", "head": None}}
    assert D.DiTArgs.from_config(old) == D.DiTArgs("tiny", None, 4, 16, 3, (2, 2))
    assert isinstance(D.dit_from_config(old), D.LightningDiT)


def test_null_class_row_exists():
    model = D.build_dit("tiny", 4, 16, 3, (2, 2))
    x, t, _ = _inputs(2, 4, 16, 3)
    model(x, t, torch.tensor([3, 3]))  # the null class
    with pytest.raises(IndexError):
        model(x, t, torch.tensor([4, 0]))


def test_rope_relative_position_property():
    grid, hd = (5, 6), 16
    cos, sin = D.rope_tables(grid, hd)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    T = grid[0] * grid[1]
    qr = D.apply_rope(q.expand(T, hd), torch.stack([cos, sin], -1))
    kr = D.apply_rope(k.expand(T, hd), torch.stack([cos, sin], -1))
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(T))  # rotations
    scores = qr @ kr.T  # (T, T)
    pos = [(i, j) for i in range(grid[0]) for j in range(grid[1])]
    by_offset: dict[tuple[int, int], list[float]] = {}
    for a, pa in enumerate(pos):
        for b, pb in enumerate(pos):
            by_offset.setdefault((pa[0] - pb[0], pa[1] - pb[1]), []).append(scores[a, b].item())
    for vals in by_offset.values():
        np.testing.assert_allclose(vals, vals[0], rtol=1e-5, atol=1e-5)
    # the score does depend on the offset, and rows differ from columns
    assert abs(by_offset[(1, 0)][0] - by_offset[(0, 1)][0]) > 1e-3
    assert abs(by_offset[(0, 0)][0] - by_offset[(2, 3)][0]) > 1e-3
    # independent formula: pairs as complex numbers times e^{iθ}, θ = row·f or col·f
    quarter = hd // 4
    f = 10000.0 ** (-np.arange(quarter) / quarter)
    i, j = 3, 4
    theta = np.concatenate([i * f, j * f])
    qc = (q[0::2].double().numpy() + 1j * q[1::2].double().numpy()) * np.exp(1j * theta)
    got = qr[i * grid[1] + j].double().numpy()
    np.testing.assert_allclose(got[0::2], qc.real, atol=1e-5)
    np.testing.assert_allclose(got[1::2], qc.imag, atol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_matches_manual_softmax(qk_norm):
    torch.manual_seed(0)
    attn = D.Attention(32, 2, qk_norm=qk_norm)
    assert attn.qkv.bias is not None  # qkv bias, as the references
    cos, sin = D.rope_tables((2, 3), 16)
    x = torch.randn(2, 6, 32)
    q, k, v = attn.qkv(x).reshape(2, 6, 3, 2, 16).permute(2, 0, 3, 1, 4)

    def rms(z, w):
        return z / z.square().mean(-1, keepdim=True).add(1e-6).sqrt() * w

    if qk_norm:
        torch.nn.init.normal_(attn.q_norm.weight)
        torch.nn.init.normal_(attn.k_norm.weight)
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    rope = torch.stack([cos, sin], -1)
    q, k = D.apply_rope(q, rope), D.apply_rope(k, rope)
    w = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(attn(x, rope), ref, rtol=1e-5, atol=1e-5)


def test_sincos_pos_embed_formula():
    """Independent formula (MAE/DiT's get_2d_sincos_pos_embed, generalised to h != w): half
    the channels for the column, half for the row, sin then cos, ω_k = 10000^(-4k/D)."""
    grid, dim = (3, 5), 16
    pe = D.sincos_pos_embed(grid, dim)
    assert pe.shape == (15, 16)
    i, j = 2, 3  # row, column
    w = 10000.0 ** (-np.arange(4) / 4)
    want = np.concatenate([np.sin(j * w), np.cos(j * w), np.sin(i * w), np.cos(i * w)])
    np.testing.assert_allclose(pe[i * 5 + j].numpy(), want, rtol=1e-6, atol=1e-6)
    model = D.build_dit("tiny", 15, 32, 4, grid)
    torch.testing.assert_close(model.pos_embed[0], D.sincos_pos_embed(grid, 192))
    assert "pos_embed" in model.state_dict()  # saved with the weights, as the references do
    assert "pos_embed" not in D.build_dit("tiny", 15, 32, 4, grid, pos_embed=False).state_dict()


def test_norms_have_learnable_weights_and_time_embeddings():
    model = D.build_dit("tiny", 4, 16, 3, (2, 2))
    names = dict(model.named_parameters())
    assert "blocks.0.norm1.weight" in names and "final_layer.norm_final.weight" in names
    assert "blocks.0.attn.q_norm.weight" not in names  # qk-norm off by default
    assert "blocks.0.attn.q_norm.weight" in dict(
        D.build_dit("tiny", 4, 16, 3, (2, 2), qk_norm=True).named_parameters())
    # Gaussian-Fourier time features: fixed W (a saved buffer, not trained)
    assert "t_embedder.W" in model.state_dict() and "t_embedder.W" not in names
    t = torch.tensor([0.0, 0.3])
    W = model.t_embedder.W
    feats = torch.cat([torch.sin(2 * math.pi * t[:, None] * W), torch.cos(2 * math.pi * t[:, None]
                                                                         * W)], dim=-1)
    torch.testing.assert_close(model.t_embedder(t), model.t_embedder.mlp(feats))
    sin = D.build_dit("tiny", 4, 16, 3, (2, 2), time_embed="sinusoidal")
    half = 128
    f = torch.exp(-math.log(10000) * torch.arange(half) / half)
    feats = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], dim=-1)
    torch.testing.assert_close(sin.t_embedder(t), sin.t_embedder.mlp(feats))
    with pytest.raises(ValueError, match="unknown DiT switches"):
        D.build_dit("tiny", 4, 16, 3, (2, 2), qknorm=True)


def test_ditdh_structure():
    """RAE's DiTwDDTHead: the head reads the tokens again (x_embedder) and is conditioned per
    token on s_projector(silu(trunk output + t_emb)); 128-wide attention heads by default."""
    model = D.build_dit("tiny", 16, 32, 4, (4, 4), head={"depth": 2, "width": 256})
    assert isinstance(model, D.DiTDH) and len(model.blocks) == 4 and len(model.head_blocks) == 2
    assert model.head_blocks[0].attn.heads == 2 and model.blocks[0].attn.heads == 3
    assert model.s_projector.weight.shape == (256, 192)
    same = D.build_dit("tiny", 16, 32, 4, (4, 4), head={"depth": 1, "width": 192, "heads": 3})
    assert isinstance(same.s_projector, torch.nn.Identity)
    x, t, y = _inputs(2, 16, 32, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        # the head's condition, computed by hand from the trunk
        t_emb = model.t_embedder(t)
        c = F.silu(t_emb + model.y_embedder(y))
        s = model.s_embedder(x) + model.pos_embed
        for block in model.blocks:
            s = block(s, c, model.rope)
        s = model.s_projector(F.silu(s + t_emb[:, None]))
        h = model.x_embedder(x)
        for block in model.head_blocks:
            h = block(h, s, model.head_rope)
        torch.testing.assert_close(model(x, t, y), model.final_layer(h, s))


# ---------------------------------------------------------------- DDP

def _step_inputs(steps, B, T, C, K, R):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        z0 = torch.randn(B, T, C, generator=g)
        z0 = R * z0 / z0.norm(dim=-1, keepdim=True)
        z1, t, y = TD.draw_inputs(z0, torch.randint(0, K, (B,), generator=g), g, r=R, alpha=1.5,
                                  path="rfm", label_dropout=0.2, null_class=K)
        out.append((z0, z1, t, y))
    return out


def _fresh_model_and_opt():
    torch.manual_seed(0)
    model = D.build_dit("tiny", 4, 16, 3, (2, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    return model, opt


def _ddp_worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    model, opt = _fresh_model_and_opt()
    net = torch.nn.parallel.DistributedDataParallel(model)
    losses = []
    for z0, z1, t, y in _step_inputs(3, 8, 4, 16, 3, 4.0):
        sl = slice(rank * 4, (rank + 1) * 4)
        res = TD.train_step(net, opt, z0[sl], z1[sl], t[sl], y[sl], r=4.0, path="rfm",
                            lambda_rad=0.1, grad_clip=0.05)
        losses.append(res["loss"])
    if rank == 0:
        torch.save({"model": model.state_dict(), "losses": losses}, out_file)
    dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_on_combined_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt")), nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    model, opt = _fresh_model_and_opt()
    losses = []
    for z0, z1, t, y in _step_inputs(3, 8, 4, 16, 3, 4.0):
        res = TD.train_step(model, opt, z0, z1, t, y, r=4.0, path="rfm", lambda_rad=0.1,
                            grad_clip=0.05)
        assert res["ok"] and res["grad_norm"] > 0.05  # clipping is active
        losses.append(res["loss"])
    np.testing.assert_allclose(ddp["losses"], losses, rtol=1e-5)
    init, _ = _fresh_model_and_opt()
    for name, p in model.state_dict().items():
        torch.testing.assert_close(ddp["model"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, init.state_dict()[n]) for n, p in model.state_dict().items())


# ---------------------------------------------------------------- training loop

class FakeCache:
    """In-memory stand-in with the LatentCache reader interface: unit-norm tokens clustered by
    class, deterministic epoch shuffles, DDP split as LatentCache.batches'. `hook(n)` runs
    before the n-th batch (1-based, counted over the object's life) is handed out."""

    def __init__(self, n=40, grid=(2, 2), C=16, K=3, hook=None, nan_batches=()):
        g = torch.Generator().manual_seed(123)
        T = grid[0] * grid[1]
        self.labels = torch.arange(n) % K
        centers = torch.randn(K, T, C, generator=g)
        x = centers[self.labels] + 0.3 * torch.randn(n, T, C, generator=g)
        self.tokens = x / x.norm(dim=-1, keepdim=True)
        self.attrs = {"grid": list(grid), "channels": C, "num_classes": K, "mean_norm": 3.0}
        self.hook, self.served, self.nan_batches = hook, 0, set(nan_batches)

    def __len__(self):
        return len(self.labels)

    def batches(self, batch_size, *, shuffle=True, seed=0, epoch=0, rank=0, world_size=1,
                radius=1.0, drop_last=True, raw=False):
        n = len(self)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        whole = batch_size * world_size  # rank r: its rows of each global batch, as the reader
        for i in range(0, len(order) - whole + 1, whole):
            self.served += 1
            if self.hook is not None:
                self.hook(self.served)
            idx = torch.as_tensor(order[i + rank * batch_size:i + (rank + 1) * batch_size])
            x = self.tokens[idx].half() if raw else self.tokens[idx] * radius
            if self.served in self.nan_batches:
                x = torch.full_like(x, float("nan"))
            yield x, self.labels[idx]


def _cfg(tmp_path, steps=7):
    cfg = tiny_config(tmp_path)
    cfg["device"] = "cpu"
    cfg["dit"].update(steps=steps, batch_size=8, ckpt_every=3, log_every=2, image_every=100,
                      warmup_steps=2)
    return {k: cfg[k] for k in ("seed", "device", "dit", "sample")}


def _assert_same_state(a, b):
    """Equal weights and EMA; the final checkpoints hold no optimizer state, but the steps
    after a resume only give equal weights when AdamW's moments were restored exactly."""
    assert "optimizer" not in a and "optimizer" not in b
    for part in ("model", "ema"):
        for name, p in a[part].items():
            assert torch.equal(p, b[part][name]), (part, name)


def test_train_resume_after_crash_and_sigterm_matches_uninterrupted(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path)
    ref = TD.train_dit(cfg, FakeCache(), None, tmp_path / "ref")
    ref_ck = load_checkpoint(ref)
    assert ref_ck["kind"] == "dinosae-dit" and ref_ck["step"] == 7
    assert ref_ck["config"]["grid"] == [2, 2] and ref_ck["config"]["radius"] == 4.0

    # a hard kill while fetching the 6th batch: last.pt (step 3) survives, no checkpoint.pt
    def crash(n):
        if n == 6:
            raise KeyboardInterrupt("simulated kill")

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        TD.train_dit(cfg, FakeCache(hook=crash), None, out)
    assert not (out / "checkpoint.pt").exists()
    assert load_checkpoint(out / "last.pt")["step"] == 3
    TD.train_dit(cfg, FakeCache(), None, out)
    _assert_same_state(load_checkpoint(out / "checkpoint.pt"), ref_ck)

    # SIGTERM before the 5th batch: the loop finishes step 5, writes last.pt and exits
    def term(n):
        if n == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "term"
    with pytest.raises(SystemExit):
        TD.train_dit(cfg, FakeCache(hook=term), None, out)
    assert load_checkpoint(out / "last.pt")["step"] == 5
    assert not (out / "checkpoint.pt").exists()
    TD.train_dit(cfg, FakeCache(), None, out)
    _assert_same_state(load_checkpoint(out / "checkpoint.pt"), ref_ck)
    with open(out / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [2, 4, 6, 7]

    # the EMA generator loads and has the right shape
    model, meta = load_dit(ref, "cpu")
    assert meta["num_classes"] == 3 and meta["step"] == 7 and not model.training
    x, t, y = _inputs(2, 4, 16, 3)
    assert model(x, t, y).shape == (2, 4, 16)
    for name, p in model.state_dict().items():
        assert torch.equal(p, ref_ck["ema"][name])


def _loop_worker(rank, world, port, cfg, out):
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cache = FakeCache()
    TD.train_dit(cfg, cache, None, out)
    torch.save({"served": cache.served}, os.path.join(out, f"served{rank}.pt"))


def test_training_loop_runs_under_ddp(tmp_path):
    """torchrun-style env, 2 gloo ranks: the loop splits the global batch, agrees on stopping,
    checkpoints once (rank 0) and resumes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(tmp_path, steps=4)
    out = str(tmp_path / "ddp")
    mp.spawn(_loop_worker, args=(2, port, cfg, out), nprocs=2)
    ck = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert ck["step"] == 4 and ck["world_size"] == 2
    # 40 samples, global batch 8 = 4 per rank: 5 batches per epoch per rank, 4 steps served
    for rank in range(2):
        assert torch.load(tmp_path / "ddp" / f"served{rank}.pt")["served"] == 4
    assert not dist.is_initialized()


def _signalled_worker(rank, world, port, cfg, out):
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    def term(n):  # only rank 1 is signalled, before its 2nd batch
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        TD.train_dit(cfg, FakeCache(hook=term if rank == 1 else None), None, out)
        result = "finished"
    except SystemExit as e:
        result = str(e)
    torch.save({"result": result}, os.path.join(out, f"result{rank}.pt"))


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """The stop flag travels in the step's own reduction (one host sync per step): rank 0, never
    signalled, stops after the same step as rank 1 and saves last.pt there."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(tmp_path, steps=6)  # ckpt_every 3: last.pt at step 2 only because of the signal
    out = tmp_path / "ddp"
    mp.spawn(_signalled_worker, args=(2, port, cfg, str(out)), nprocs=2)
    for rank in range(2):
        assert "stopped by signal after step 2" in torch.load(out / f"result{rank}.pt")["result"]
    assert load_checkpoint(out / "last.pt")["step"] == 2
    assert not (out / "checkpoint.pt").exists()


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    cfg = _cfg(tmp_path, steps=6)
    cfg["dit"]["max_bad_steps"] = 3
    out = TD.train_dit(cfg, FakeCache(nan_batches={2, 3}), None, tmp_path / "a")
    ck = load_checkpoint(out)
    assert ck["bad_steps"] == 2
    assert all(torch.isfinite(p).all() for p in ck["model"].values())
    with open(tmp_path / "a" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["bad_steps"]) for r in rows] == [1, 2, 2]
    with pytest.raises(FloatingPointError, match="3 non-finite"):
        TD.train_dit(cfg, FakeCache(nan_batches={2, 3, 4, 5}), None, tmp_path / "b")


def test_sample_grid_decoded_at_s_vae(tmp_path, monkeypatch):
    seen = []

    class FakeAE:  # the real decode_at (rescale, then decode) around a stand-in decoder
        decoder = torch.nn.Linear(1, 1)
        decode_at = DinoSAE.decode_at

        def decode(self, z):
            seen.append(z.norm(dim=-1))
            return torch.rand(z.shape[0], 3, 8, 8)

    fake = types.ModuleType("dinosae.models.autoencoder")
    fake.DinoSAE = types.SimpleNamespace(load=lambda path, device="cpu": FakeAE())
    monkeypatch.setitem(sys.modules, "dinosae.models.autoencoder", fake)
    cfg = _cfg(tmp_path, steps=4)
    cfg["dit"].update(path="euclidean", image_every=2)
    TD.train_dit(cfg, FakeCache(), "ae.pt", tmp_path / "g")
    assert (tmp_path / "g" / "samples_000002.png").is_file()
    assert (tmp_path / "g" / "samples_000004.png").is_file()
    # s_vae null -> the cache's mean_norm (3.0)
    torch.testing.assert_close(seen[0], torch.full_like(seen[0], 3.0))


def test_a_dit_rebuilt_from_a_checkpoint_skips_the_init_and_computes_as_the_original():
    """dit_from_checkpoint builds the network on the meta device and takes the file's tensors
    (no random initialisation thrown away): every tensor is real afterwards, the RoPE table
    derived at build time included, and the outputs are the saved network's."""
    config = {"dit": {"model": "S", "head": {"depth": 1, "width": 64}}, "tokens": 16,
              "channels": 8, "num_classes": 4, "grid": [4, 4]}
    torch.manual_seed(0)
    dit = D.dit_from_config(config)
    with torch.no_grad():  # away from the init (adaLN-zero would make the output 0)
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ck = {"config": config, "ema": {k: v.clone() for k, v in dit.state_dict().items()}}
    loaded = D.dit_from_checkpoint(ck, "ck")
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert torch.equal(loaded.rope, dit.rope) and torch.equal(loaded.head_rope, dit.head_rope)
    x, t, y = torch.randn(2, 16, 8), torch.rand(2), torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), dit(x, t, y))


def test_loading_into_a_meta_network_refuses_a_derived_buffer_left_on_meta():
    from dinosae.models.keymap import load_weights

    class Derived(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    state = {k: torch.ones_like(v, device="cpu") for k, v in Derived().state_dict().items()}
    with torch.device("meta"):
        m = Derived()
    with pytest.raises(RuntimeError, match=r"\['table'\] stayed on the meta device"):
        load_weights(m, state, "m")
    with torch.device("meta"):
        m = torch.nn.Linear(2, 2)
    load_weights(m, {"weight": torch.ones(2, 2, dtype=torch.float64), "bias": torch.zeros(2)}, "m")
    assert m.weight.dtype == torch.float32 and m.weight.requires_grad  # the network's dtype
    assert torch.equal(m.weight, torch.ones(2, 2))
