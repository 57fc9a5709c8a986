"""The autoencoder's losses as the training step computes them, against computations written
here: the generator loss is the configured weighted sum of L1, LPIPS, alignment (1 − cos with
the teacher's tokens) and, from stage 2, adv·λ·GAN with λ the ratio of the reconstruction and
GAN gradient norms at the decoder's last layer; the discriminator step's hinge loss on
hand-made logits (real pushed above +1, reconstructions below −1)."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from test_train_ae import small_config

from dinosae.models.discriminator import Discriminator, diffaug, teacher_features
from dinosae.train import ae as TA

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
WEIGHTS = {"l1": 0.7, "lpips": 1.3, "align": 0.45, "adv": 0.35, "adaptive_max": 1e4}


def _stage(number: int) -> TA.Stage:
    """Stage `number`'s networks around stage 1's freshly built autoencoder (the losses do not
    care where the weights came from); weights chosen so that no two are equal."""
    cfg = small_config()
    cfg["ae_train"]["loss"] = dict(WEIGHTS)
    st = TA.build_stage(cfg, 1, None, CPU)
    st.number = number
    if number >= 2:
        torch.manual_seed(3)
        d = st.args.discriminator
        st.disc = Discriminator(st.ae.channels, d["layers"], d["channels"]).train()
        st.d_opt = torch.optim.AdamW(st.disc.parameters(), lr=1e-4)
    if number >= 3:
        st.ae.encoder.stem.requires_grad_(False)
    return st


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _f(v) -> float:
    return float(v.detach()) if torch.is_tensor(v) else float(v)


def _tcfg() -> dict:
    tcfg = small_config()["ae_train"]
    tcfg["loss"] = dict(WEIGHTS)
    tcfg["grad_clip"] = 1e9
    return tcfg


def _by_hand(st: TA.Stage, x: torch.Tensor, gen_seed: int) -> dict:
    """Every term from the networks' outputs, before the step changes anything."""
    ae = copy.deepcopy(st.ae)
    z = ae.encode(x)
    rec = ae.decode(z)
    l1 = (rec - x).abs().mean()
    lp = st.lpips(rec, x).mean()  # the configured perceptual net, on (reconstruction, input)
    with torch.no_grad():
        zt = ae.teacher_tokens(x)
    align = (1 - (F.normalize(z, dim=-1) * F.normalize(zt, dim=-1)).sum(-1)).mean()
    out = {"l1": l1.item(), "lpips": lp.item(), "align": align.item()}
    rec_loss = WEIGHTS["l1"] * l1 + WEIGHTS["lpips"] * lp
    total = rec_loss + (WEIGHTS["align"] * align if st.number <= 2 else 0.0)
    if st.number >= 2:
        disc = copy.deepcopy(st.disc).requires_grad_(False)
        g = torch.Generator().manual_seed(gen_seed)
        feats = teacher_features(ae.encoder.vit, diffaug(rec, g), st.args.discriminator["layers"])
        g_gan = -disc(feats).mean()
        w = ae.decoder.last_layer
        gr = torch.autograd.grad(rec_loss, w, retain_graph=True)[0]
        gg = torch.autograd.grad(g_gan, w, retain_graph=True)[0]
        lam = (gr.norm() / (gg.norm() + 1e-6)).clamp(0, WEIGHTS["adaptive_max"])
        out.update(g_gan=g_gan.item(), lam=lam.item())
        total = total + WEIGHTS["adv"] * lam * g_gan
    out["loss"] = total.item()
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_generator_loss_is_the_configured_weighted_sum(stage):
    st = _stage(stage)
    x = _images()
    want = _by_hand(st, x, gen_seed=11)
    assert want["lpips"] > 1e-3 and want["l1"] > 1e-3 and want["align"] > 1e-3
    row, rec, ok = TA.generator_step(st, st.ae, x, None, torch.Generator().manual_seed(11),
                                     train_g=True, lr=1e-4, tcfg=_tcfg(), autocast=nullcontext(),
                                     device=CPU)
    assert ok
    assert _f(row["loss"]) == pytest.approx(want["loss"], rel=1e-4)
    assert _f(row["l1"]) == pytest.approx(want["l1"], rel=1e-4)
    assert _f(row["lpips"]) == pytest.approx(want["lpips"], rel=1e-4)
    if stage <= 2:
        assert _f(row["align"]) == pytest.approx(want["align"], rel=1e-4)
    else:
        assert "align" not in row or row["align"] != row["align"]  # no alignment from stage 3
    if stage >= 2:
        assert abs(WEIGHTS["adv"] * want["lam"] * want["g_gan"]) > 1e-4  # the GAN term matters
        assert _f(row["g_gan"]) == pytest.approx(want["g_gan"], rel=1e-4)
        assert _f(row["lambda"]) == pytest.approx(want["lam"], rel=1e-3)


def test_generator_loss_gradient_is_the_weighted_sums_gradient():
    """Stage 1: one AdamW-free check of the update's direction — the decoder's last-layer
    gradient the step used equals the gradient of the weighted sum computed here."""
    st = _stage(1)
    x = _images(seed=1)
    ae = copy.deepcopy(st.ae)
    z = ae.encode(x)
    rec = ae.decode(z)
    with torch.no_grad():
        zt = ae.teacher_tokens(x)
    loss = (WEIGHTS["l1"] * (rec - x).abs().mean() + WEIGHTS["lpips"] * st.lpips(rec, x).mean()
            + WEIGHTS["align"] * (1 - F.cosine_similarity(z, zt, dim=-1)).mean())
    want = torch.autograd.grad(loss, ae.decoder.last_layer)[0]
    seen = {}
    real_step = st.opt.step

    def capture(*a, **k):
        seen["grad"] = st.ae.decoder.last_layer.grad.clone()
        return real_step(*a, **k)

    st.opt.step = capture
    TA.generator_step(st, st.ae, x, None, torch.Generator().manual_seed(0), train_g=True,
                      lr=1e-4, tcfg=_tcfg(), autocast=nullcontext(), device=CPU)
    torch.testing.assert_close(seen["grad"], want, rtol=1e-4, atol=1e-8)


class HandLogits(torch.nn.Module):
    """A discriminator that returns fixed logits: the first B rows for the real images, the rest
    for the reconstructions (whatever the features); one parameter so that a step can run."""

    def __init__(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.cat([real, fake])
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        self.seen.append([f.shape[0] for f in features])
        return self.logits * self.scale


def test_discriminator_step_hinge_on_hand_made_logits():
    st = _stage(2)
    x = _images(2, seed=2)
    rec = _images(2, seed=3)
    real = torch.tensor([[2.0, 0.5, -1.0, 0.9], [1.5, 1.0, 0.2, -0.3]])
    fake = torch.tensor([[-3.0, 0.0, 0.5, -0.8], [-1.5, 1.2, -0.9, 0.1]])
    # real logits below 1 and fake logits above −1 are penalised, each side averaged
    want_real = sum(max(0.0, 1 - v) for v in real.flatten().tolist()) / real.numel()
    want_fake = sum(max(0.0, 1 + v) for v in fake.flatten().tolist()) / fake.numel()
    disc = HandLogits(real, fake)
    row, ok = TA.discriminator_step(st, disc, x, rec, torch.Generator().manual_seed(0),
                                    d_lr=1e-4, tcfg=_tcfg(), autocast=nullcontext(), device=CPU)
    assert ok and disc.seen and all(b == 4 for b in disc.seen[0])  # real and fake together
    assert _f(row["d_loss"]) == pytest.approx(want_real + want_fake, rel=1e-6)
    assert _f(row["d_real"]) == pytest.approx(real.mean().item(), rel=1e-6)
    assert _f(row["d_fake"]) == pytest.approx(fake.mean().item(), rel=1e-6)


class HandLogitsOnImages(HandLogits):
    """RAE's discriminator stand-in: images in, fixed logits out; a frozen `dino` as the
    trainer expects; it keeps the images it was given."""

    def __init__(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        super().__init__(real, fake)
        self.dino = torch.nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.detach().clone())
        return self.logits * self.scale


def test_dino_discriminator_step_halves_the_hinge_and_sees_8_bit_fakes(monkeypatch):
    """With RAE's backbone (dino_vits8): d_loss = 0.5 (mean relu(1 - real) + mean relu(1 + fake))
    (RAE's hinge_d_loss), and the reconstructions reach the discriminator rounded to 8-bit levels
    (RAE quantises its fakes); the real images are not rounded."""
    st = _stage(2)
    st.args.discriminator["backbone"] = "dino_vits8"
    x = _images(2, seed=2)
    rec = _images(2, seed=3)
    real = torch.tensor([[2.0, 0.5, -1.0, 0.9], [1.5, 1.0, 0.2, -0.3]])
    fake = torch.tensor([[-3.0, 0.0, 0.5, -0.8], [-1.5, 1.2, -0.9, 0.1]])
    want = 0.5 * (sum(max(0.0, 1 - v) for v in real.flatten().tolist()) / real.numel()
                  + sum(max(0.0, 1 + v) for v in fake.flatten().tolist()) / fake.numel())
    given = []
    monkeypatch.setattr(TA, "disc_logits", lambda disc, images, *a, **k: (
        given.append(images.detach().clone()), disc(images))[1])
    disc = HandLogitsOnImages(real, fake)
    st.disc = disc
    st.d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-4)
    row, ok = TA.discriminator_step(st, disc, x, rec, torch.Generator().manual_seed(0),
                                    d_lr=1e-4, tcfg=_tcfg(), autocast=nullcontext(), device=CPU)
    assert ok and _f(row["d_loss"]) == pytest.approx(want, rel=1e-6)
    images = given[0]
    assert torch.equal(images[:2], x)
    levels = images[2:] * 255
    assert torch.equal(levels, levels.round())  # on the 8-bit grid ...
    assert (images[2:] - rec.clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-7  # ... nearest level
    assert not torch.equal(images[2:], rec)
