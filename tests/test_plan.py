"""`dinosae plan`: the counting (FLOPs, live bytes) against hand arithmetic and an independent
count on real tensors, the plan's arithmetic on the tiny config, and the paper profile
(workflow/profiles/imagenet256) against the paper-size plan."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from helpers import ROOT, tiny_config
from torch.overrides import TorchFunctionMode

from dinosae import cli
from dinosae import plan as P
from dinosae.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER = ROOT / "workflow/configs/imagenet256.yaml"
PAPER_PROFILE = ROOT / "workflow/profiles/imagenet256/config.yaml"
A100_80_PROFILE = ROOT / "workflow/profiles/imagenet256_a100-80/config.yaml"
GPUS = yaml.safe_load((ROOT / "dinosae/gpus.yaml").read_text())
RUNTIME_MARGIN = 1.2  # the profile's runtime over the plan's wall time


def fake_part(module: nn.Module, step, precision: str = "fp32") -> P.Part:
    world = P.FakeWorld()
    world.module(module)
    return P.Part("test", world, step, precision)


# ---------------------------------------------------------------- counting, by hand

def test_linear_counts_forward_and_both_gradients():
    with torch.device("meta"):
        lin = nn.Linear(300, 200)

    def step(b, amp):
        x = torch.randn(b, 7, 300, requires_grad=True)
        with amp():
            lin(x).sum().backward()

    part = fake_part(lin, step, "bf16")
    forward = 2 * 7 * 300 * 200  # a multiply and an add per weight per token
    assert part.flops == {"bf16": 3 * forward}  # + input gradient + weight gradient


def test_depthwise_convolution_backward_is_not_counted_as_dense():
    # torch's own formula counts the weight gradient of a grouped conv `groups` times over
    with torch.device("meta"):
        conv = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)

    def step(b, amp):
        conv(torch.randn(b, 64, 16, 16, requires_grad=True)).sum().backward()

    part = fake_part(conv, step)
    forward = 2 * 64 * 16 * 16 * 9  # one 3x3 filter per output pixel of each channel
    assert part.flops == {"tf32": 3 * forward, "fp32": 0.0}  # fp32 convs run as TF32


def test_cpu_attention_is_counted_as_attention():
    def step(b, amp):
        q, k, v = (torch.randn(b, 4, 32, 16, requires_grad=True) for _ in range(3))
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    part = fake_part(nn.Identity(), step)
    qk_av = 2 * (2 * 4 * 32 * 32 * 16)  # QK^T and AV, per head 2*T*T*d each
    # backward: scores recomputed, then grads of V, of the probabilities, of Q and of K
    assert part.flops == {"tf32": 0.0, "fp32": qk_av + 5 * qk_av / 2}


def test_live_bytes_follow_the_tensors_the_step_keeps():
    def step(b, amp):
        x = torch.empty(b, 1000)  # 4000 b bytes
        y = x * 2  # 8000 b live
        z = (y + 1).to(torch.bfloat16)  # the fp32 temporary and z at once: 14000 b
        del x  # 10000 b, then 6000 b
        w = z.float()  # 10000 b
        assert w.shape[0] == y.shape[0] == b

    part = fake_part(nn.Identity(), step)
    assert part.peak_live(1) == 14000
    assert part.peak_live(5) == 5 * 14000
    assert part.act_per_image(5) == 14000


# ---------------------------------------------------------------- an independent count

class _Counting(TorchFunctionMode):
    """FLOPs of nn.Linear / nn.Conv2d (module hooks) and scaled-dot-product attention (torch
    function level) on real tensors: no dispatcher, no fake tensors, no flop_counter."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.flops = 0
        self.handles = [m.register_forward_hook(self._module) for m in model.modules()
                        if isinstance(m, nn.Linear | nn.Conv2d)]

    def _module(self, m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(m, nn.Linear):
            self.flops += 2 * out.numel() * m.in_features
        else:
            k = m.kernel_size[0] * m.kernel_size[1]
            self.flops += 2 * out.numel() * m.in_channels // m.groups * k

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, key = args[0], args[1]
            self.flops += 4 * q.shape[:-1].numel() * key.shape[-2] * q.shape[-1]
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("plan"))  # no shards there: counts from config
    return cfg, P.measure_work(cfg, num_classes=10)


def test_forward_flops_equal_a_count_on_real_tensors(tiny):
    from dinosae.models.autoencoder import build_autoencoder
    from dinosae.models.dit import build_dit

    cfg, m = tiny
    torch.manual_seed(0)
    ae = build_autoencoder(P._plan_config(cfg)).eval()
    size = cfg["data"]["image_size"]
    with torch.no_grad(), _Counting(ae) as count:
        z = ae.encode(torch.rand(1, 3, size, size))
    encode = m.rules["encode_part"].parts[0]
    assert encode.runs == 1  # no flips in the tiny config
    assert sum(encode.flops.values()) == count.flops > 0

    dit = build_dit(cfg["dit"]["model"], z.shape[1], z.shape[2], 10, m.grid, cfg["dit"]["head"])
    with torch.no_grad(), _Counting(dit.eval()) as count:
        dit(z, torch.rand(1), torch.tensor([3]))
    # sampling is priced at its precision: sample.precision fp32 (convolutions TF32, the rest
    # fp32 CUDA cores), the gFID proxy at dit.eval_precision bf16
    assert (cfg["sample"]["precision"], cfg["dit"]["eval_precision"]) == ("fp32", "bf16")
    sample = m.rules["sample"].parts[0]
    assert set(sample.flops) == {"tf32", "fp32"} and sum(sample.flops.values()) == count.flops
    assert m.rules["gfid_proxy"].parts[0].flops == {"bf16": count.flops}
    assert m.rules["gfid_proxy"].parts[1] is m.rules["sample"].parts[1]  # the same decode
    # cfg_scale 1.5 over the whole interval: the conditional and the null class at every step
    assert (sample.runs, sample.batch_factor) == (2 * cfg["sample"]["steps"], 2)
    # train_dit: forward + backward of the same network, about three forwards
    assert 2.9 < m.rules["train_dit"].flops()["bf16"] / count.flops < 3.2
    assert m.n_dit == sum(p.numel() for p in dit.parameters())


# ---------------------------------------------------------------- the plan's arithmetic

def test_plan_arithmetic_on_the_tiny_config(tiny):
    cfg, m = tiny
    p = P.make_plan(cfg, "b200", gpus=2, mfu=0.25)
    spec = GPUS["b200"]
    rows = {r.rule: r for r in p.rules}
    assert list(rows) == ["ae_stage1", "ae_stage2", "ae_stage3", "ae_stage4", "eval_recon",
                          "encode_part", "train_dit", "sample", "fid_reference", "fid"]
    tc, dc, sc = cfg["ae_train"], cfg["dit"], cfg["sample"]
    assert rows["ae_stage2"].images == tc["stages"][1]["steps"] * tc["stages"][1]["batch_size"]
    assert rows["train_dit"].images == dc["steps"] * dc["batch_size"]
    assert rows["encode_part"].images == p.data.train == 10 * cfg["data"]["mini"]["train_per_class"]
    assert rows["fid_reference"].images == p.data.val  # eval.reference: val
    for rule, r in rows.items():
        flops = m.rules[rule].flops()
        seconds = r.images * sum(f / (spec[k] * 1e12 * 0.25) for k, f in flops.items())
        assert r.gpu_hours == pytest.approx(seconds / 3600, rel=1e-9)
        per_job = 2 if rule.startswith("ae_stage") or rule == "train_dit" else 1
        assert r.gpus == per_job
        assert r.job_hours == pytest.approx(r.gpu_hours / per_job / r.jobs, rel=1e-9)
    assert rows["encode_part"].jobs == cfg["latents"]["parts"] == 2
    assert rows["encode_part"].wall_hours == pytest.approx(rows["encode_part"].job_hours)
    assert rows["ae_stage1"].batch == tc["stages"][0]["batch_size"] // 2
    # DiT state: weights, EMA, two AdamW moments and the DDP buckets, fp32 each
    assert rows["train_dit"].state_bytes == 5 * 4 * m.n_dit
    assert rows["train_dit"].peak_bytes > rows["train_dit"].state_bytes
    # disk: the cache's arrays from their shapes, the samples as uint8 images
    T, C, n = 4, 64, p.data.train  # 32 px: a 2x2 grid of the 64-wide teacher's tokens
    assert (m.tokens, m.channels) == (T, C)
    assert p.disk["latent cache"] == n * (T * C * 2 + T * 4 + 8)
    assert p.disk["samples"] == sc["num_samples"] * 32 * 32 * 3
    assert p.disk["dit checkpoint"] == 8 * m.n_dit  # weights and EMA, fp32
    assert p.disk["dit last.pt while training"] == 16 * m.n_dit  # + two AdamW moments


def test_cache_size_follows_dtype_and_flip(tiny, monkeypatch):
    """The latent cache line (dinosae.latents.store.bytes_per_image), against the arrays' sizes
    written out by hand: int8 tokens + a float16 scale per token, norms, twice with flips."""
    cfg, m = tiny
    monkeypatch.setattr(P, "measure_work", lambda *a, **k: m)  # the networks do not change
    T, C = 4, 64
    # (float16 without flips: test_plan_arithmetic_on_the_tiny_config)
    c = copy.deepcopy(cfg)
    c["latents"].update(dtype="int8", flip=True)
    p = P.make_plan(c, "h100", gpus=1, mfu=0.25)
    assert p.disk["latent cache"] == p.data.train * (2 * (T * C + T * 2 + T * 4) + 8)


def test_memory_column_follows_the_micro_batch(tiny):
    cfg, m = tiny
    spec, work = GPUS["h200"], m.rules["train_dit"]
    big = {**cfg, "dit": {**cfg["dit"], "batch_size": 64, "micro_batch": 8},
           "ae_train": {**cfg["ae_train"], "micro_batch": 1}}
    data = P.dataset_counts(cfg)
    loads = P.rule_loads(big, data)
    assert (loads["train_dit"].micro, loads["ae_stage3"].micro) == (8, 1)
    dit = P.rule_plan("train_dit", work, loads["train_dit"], 1, spec, 0.05)
    ae = P.rule_plan("ae_stage2", m.rules["ae_stage2"], loads["ae_stage2"], 1, spec, 0.05)
    assert (dit.batch, dit.micro, dit.accum) == (64, 8, 8)
    assert (ae.batch, ae.micro, ae.accum) == (4, 1, 4)
    # one micro-batch's step holds the memory: the peak of a plain step of batch 8, not 64
    plain = P.rule_loads({**cfg, "dit": {**cfg["dit"], "batch_size": 8, "micro_batch": None}},
                         data)["train_dit"]
    eight = P.rule_plan("train_dit", work, plain, 1, spec, 0.05)
    assert (eight.batch, eight.accum) == (8, 1)
    assert dit.peak_bytes == eight.peak_bytes and dit.act_bytes == eight.act_bytes
    assert dit.peak_bytes < dit.state_bytes + work.peak_live(64)
    assert dit.flops_per_step == 64 * dit.flops_per_image  # the step still does 64 images
    p = P.make_plan(cfg, "h200", gpus=1)  # measured already: its table with these rows
    text = P.format_plan(dataclasses.replace(p, rules=[ae, dit]))
    line = next(x for x in text.splitlines() if x.startswith("train_dit "))
    assert " 64 " in line and " 8 x 8 " in line and "micro x acc" in text
    assert P._si(dit.peak_bytes, "B") in line


def test_fid_reference_price_scales_with_the_reference_split(tiny):
    cfg, m = tiny
    cfg = {**cfg, "eval": {**cfg["eval"], "reference": "train"}}
    spec, work = GPUS["h100"], m.rules["fid_reference"]
    per_image = sum(f / (spec[k] * 1e12 * 0.05) for k, f in work.flops().items())
    for n in (1_281_167, 2 * 1_281_167):  # the whole train split is streamed
        load = P.rule_loads(cfg, P.Dataset(n, 50_000, 1000, "test"))["fid_reference"]
        row = P.rule_plan("fid_reference", work, load, 8, spec, 0.05, memory=False)
        assert row.images == n
        assert row.gpu_hours == pytest.approx(n * per_image / 3600, rel=1e-9)
    # ADM's reference batch instead: its 10k images (arr_0), whatever the split's size
    adm = {**cfg, "eval": {**cfg["eval"], "adm_reference": "VIRTUAL_imagenet256_labeled.npz"}}
    assert P.rule_loads(adm, P.Dataset(10**6, 50_000, 1000, "test"))["fid_reference"].images \
        == 10_000


def test_cli_prints_the_table(tmp_path, capsys, tiny):
    cfg, _ = tiny
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.build_parser().parse_args(["plan", "--configfile", "x.yaml"]).config == "x.yaml"
    assert cli.main(["plan", "--configfile", str(path), "--gpu", "h200", "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 x NVIDIA H200" in out and "MFU 0.05" in out
    for rule in ("ae_stage1", "encode_part", "train_dit", "sample", "fid"):
        assert f"\n{rule} " in out
    assert "latent cache" in out


def test_cli_refuses_an_unknown_gpu_in_one_line(tmp_path, capsys, tiny):
    cfg, _ = tiny
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["plan", "--configfile", str(path), "--gpu", "a100"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'a100'" in err and "h200" in err


# ---------------------------------------------------------------- paper size and its profile

@pytest.fixture(scope="module")
def paper():
    """The paper configuration's plan on 8 x H200 (measured once: about a minute on 2 cores)."""
    cfg = load_config(PAPER, check_paths=False)
    return cfg, P.make_plan(cfg, "h200", gpus=8)


def test_paper_networks_have_the_published_sizes_and_flops(paper):
    cfg, _ = paper
    m = P.measure_work(cfg, 1000)
    assert (m.grid, m.channels) == ((16, 16), 1024)
    # ViT-L/16 at 256 px: 256 patches + CLS + 4 registers, 24 blocks of width 1024 (MLP 4096)
    T, D = 261, 1024
    vit = 24 * (2 * T * (3 * D * D + D * D + 2 * 4 * D * D) + 4 * T * T * D)
    stem = 2 * (3 * 49 * 64 * 128**2 + 64 * 9 * 128 * 64**2 + 128 * 9 * 256 * 32**2
                + 256 * 9 * 1024 * 16**2)
    encode = m.rules["encode_part"].parts[0]
    assert sum(encode.flops.values()) == pytest.approx(vit + stem, rel=1e-3)
    # LightningDiT-XL, patch 1: 28 blocks of width 1152, SwiGLU 3072, on 256 tokens of 1024;
    # the same as DiT-XL/2's published 118.6 GMACs but for the wider token projections
    T, D, H = 256, 1152, 3072
    block = 2 * T * (3 * D * D + D * D + 2 * D * H + H * D) + 4 * T * T * D + 2 * D * 6 * D
    dit = 28 * block + 2 * 2 * T * 1024 * D
    assert sum(m.rules["sample"].parts[0].flops.values()) == pytest.approx(dit, rel=2e-3)
    assert m.rules["sample"].parts[0].flops["fp32"] > 0.99 * dit  # sample.precision: fp32
    assert 670e6 < m.n_dit < 690e6  # DiT-XL's 675 M


def test_paper_dit_epoch_time_lands_within_2x_of_the_papers_figure(paper):
    # the paper: about 20 min per ImageNet epoch (1.28 M images) for LightningDiT-XL on 8 B200
    cfg, _ = paper
    p = P.make_plan(cfg, "b200", gpus=8)
    dit = next(r for r in p.rules if r.rule == "train_dit")
    epochs = dit.images / P.IMAGENET["train"]
    minutes = dit.wall_hours * 60 / epochs
    assert 10 < minutes < 40, minutes


def profile_resources(path=PAPER_PROFILE) -> dict[str, dict]:
    prof = yaml.safe_load(path.read_text())
    return {rule: {**prof["default-resources"], **res}
            for rule, res in prof["set-resources"].items()}


def test_paper_profile_runtimes_cover_the_plan_at_its_gpu_counts(paper):
    cfg, _ = paper
    res = profile_resources()
    gpus = {rule: int(r.get("gpu", 0)) for rule, r in res.items()}
    hours = P.job_hours(cfg, "h200", gpus)
    assert set(hours) <= set(res)
    for rule, h in hours.items():
        assert gpus[rule] >= 1, rule
        assert res[rule]["runtime"] >= RUNTIME_MARGIN * h * 60, (rule, h)


def test_paper_profile_fits_every_rule_in_gpu_and_host_memory(paper):
    _, p = paper
    res = profile_resources()
    for r in p.rules:
        assert r.gpus == res[r.rule]["gpu"], r.rule  # planned at the profile's GPU counts
        assert r.fits, (r.rule, r.peak_bytes)
        assert r.peak_bytes <= P.FIT_FRACTION * GPUS["h200"]["memory_gb"] * 1e9
        # every rank can stage its GPU state (weights, AdamW, EMA) in host memory
        assert res[r.rule]["mem_mb"] * 1e6 >= r.gpus * r.state_bytes, r.rule
    assert not math.isnan(sum(r.peak_bytes for r in p.rules))


def test_a100_80_profile_runtimes_cover_the_plan_and_its_micro_batches_fit(paper):
    cfg, _ = paper
    res = profile_resources(A100_80_PROFILE)
    gpus = {rule: int(r.get("gpu", 0)) for rule, r in res.items()}
    for rule, h in P.job_hours(cfg, "a100-80", gpus).items():
        assert gpus[rule] >= 1 and res[rule]["runtime"] >= RUNTIME_MARGIN * h * 60, (rule, h)
    p = P.make_plan(cfg, "a100-80", gpus=8)  # the per-GPU batches traced by the paper plan
    m = P.measure_work(cfg, 1000)
    budget = P.FIT_FRACTION * GPUS["a100-80"]["memory_gb"] * 1e9
    for r in p.rules:
        micro = res[r.rule].get("micro_batch", r.batch)
        assert r.gpus == res[r.rule]["gpu"] and 1 <= micro <= r.batch, r.rule
        assert r.state_bytes + m.rules[r.rule].peak_live(micro) <= budget, r.rule
        assert res[r.rule]["mem_mb"] * 1e6 >= r.gpus * r.state_bytes, r.rule


def test_a100_80_profile_micro_batches_are_what_plan_gpu_chooses(paper):
    # cheap after the paper fixture: the search traces the DiT at 2 sizes and sample at 1
    cfg, _ = paper
    res = profile_resources(A100_80_PROFILE)
    fits = P.micro_batch_fits(cfg, P.make_plan(cfg, "a100-80", gpus=8))
    assert {f.rule for f in fits} <= set(res)
    for f in fits:
        assert res[f.rule].get("micro_batch", f.batch) == f.micro, f.rule
    assert any(f.micro < f.batch for f in fits)  # the DiT needs accumulation on 80 GB


def test_gfid_proxy_cost_is_sample_and_fid_work_on_its_samples():
    from types import SimpleNamespace

    from dinosae.plan import proxy_note

    def work(flops):  # a rule's work per image, as RuleWork.flops() gives it
        return SimpleNamespace(flops=lambda: {"bf16": flops})

    m = SimpleNamespace(rules={"gfid_proxy": work(3e15), "fid": work(1e15), "sample": work(1e20),
                               "train_dit": work(1e20)})
    cfg = {"dit": {"eval_samples": 100, "eval_every": 0, "steps": 10}}
    # 100 images x 4e15 FLOP at 1000 TFLOPS x MFU 0.5 = 800 s
    note = proxy_note(cfg, m, {"bf16": 1000.0}, 0.5)
    assert "100 samples (bf16 sampling) cost 13 min per evaluation" in note and "off" in note
    cfg["dit"]["eval_every"] = 4  # steps 4, 8 and the last, 10
    assert "3 evaluations, 40 min" in proxy_note(cfg, m, {"bf16": 1000.0}, 0.5)
