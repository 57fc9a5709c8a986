"""dinosae.rfm: loss decomposition, time law (KS test against the closed-form CDF), noise,
and the sampler driven by models whose exact flow is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dinosae import rfm, sphere


def _unit_points(*shape: int, r: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return r * x / x.norm(dim=-1, keepdim=True)


def _design_target(z0, z1, t, r):
    """z_t and u_t from DESIGN.md's formulas with Ω = arccos, in float64."""
    z0, z1 = z0.double(), z1.double()
    omega = torch.arccos(((z0 * z1).sum(-1, keepdim=True) / r**2).clamp(-1, 1))
    t = t.double().reshape(-1, 1, 1)
    zt = (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)
    ut = omega / torch.sin(omega) * (torch.cos(t * omega) * z1 - torch.cos((1 - t) * omega) * z0)
    return zt, ut


def test_alpha_for():
    assert rfm.alpha_for(256, 1024) == 8.0  # the paper's value at 256 px
    assert math.isclose(rfm.alpha_for(4, 64), math.sqrt(4 * 64 / 4096))


def test_loss_zero_at_target_and_radial_penalty_is_lambda_weighted():
    torch.manual_seed(0)
    C, r = 64, 8.0
    z0 = _unit_points(6, 4, C, r=r, seed=1)
    z1 = _unit_points(6, 4, C, r=r, seed=2)
    t = torch.rand(6)
    zt, ut = _design_target(z0, z1, t, r)
    zhat = (zt / zt.norm(dim=-1, keepdim=True)).float()
    ut = ut.float()
    scale = ut.square().mean()
    assert rfm.rfm_loss(ut, z0, z1, t, r) < 1e-9 * scale

    # a radial part a·ẑ_t adds exactly λ·mean‖a·ẑ_t‖² (mean over elements)
    a = 3.0 * torch.randn(6, 4, 1)
    radial = a * zhat
    for lam in (0.1, 0.5, 2.0):
        expected = lam * radial.square().mean()
        torch.testing.assert_close(rfm.rfm_loss(ut + radial, z0, z1, t, r, lambda_rad=lam),
                                   expected, rtol=1e-4, atol=1e-6 * scale)
    # a tangent error w counts fully
    w = torch.randn(6, 4, C)
    w = w - (w * zhat).sum(-1, keepdim=True) * zhat
    torch.testing.assert_close(rfm.rfm_loss(ut + w, z0, z1, t, r), w.square().mean(),
                               rtol=1e-4, atol=1e-6)
    tan, rad = rfm.rfm_loss_parts(ut + w + radial, z0, z1, t, r)
    torch.testing.assert_close(tan, w.square().mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rad, radial.square().mean(), rtol=1e-4, atol=1e-6)


def test_loss_is_fp32_for_bf16_predictions():
    C, r = 32, math.sqrt(32)
    z0, z1 = _unit_points(2, 3, C, r=r, seed=3), _unit_points(2, 3, C, r=r, seed=4)
    t = torch.rand(2)
    out = torch.randn(2, 3, C).bfloat16()
    loss = rfm.rfm_loss(out, z0.bfloat16(), z1.bfloat16(), t, r)
    assert loss.dtype == torch.float32
    ref = rfm.rfm_loss(out.float(), z0.bfloat16().float(), z1.bfloat16().float(), t, r)
    assert loss.item() == ref.item()


def test_euclidean_path_and_loss():
    z0, z1 = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    t = torch.tensor([0.0, 0.25, 1.0])
    zt = rfm.interpolate(z0, z1, t, 1.0, "euclidean")
    torch.testing.assert_close(zt[0], z0[0])
    torch.testing.assert_close(zt[1], 0.75 * z0[1] + 0.25 * z1[1])
    torch.testing.assert_close(zt[2], z1[2])
    out = torch.randn(3, 2, 8)
    torch.testing.assert_close(rfm.euclidean_loss(out, z0, z1, t),
                               torch.nn.functional.mse_loss(out, z1 - z0))
    loss, parts = rfm.flow_loss(out, z0, z1, t, 1.0, "euclidean")
    assert parts == {} and loss.item() == rfm.euclidean_loss(out, z0, z1, t).item()
    with pytest.raises(ValueError, match="unknown flow path"):
        rfm.interpolate(z0, z1, t, 1.0, "spherical")


def test_shifted_time_law_matches_closed_form_cdf():
    g = torch.Generator().manual_seed(0)
    for alpha in (1.0, 8.0):
        t = rfm.sample_time(20000, alpha, g).double().numpy()
        assert (t > 0).all() and (t < 1).all()

        def cdf(x, alpha=alpha):
            s = x / (alpha - (alpha - 1) * x)  # inverse of the shift
            return stats.norm.cdf(np.log(s) - np.log1p(-s))

        assert stats.kstest(t, cdf).pvalue > 0.01
    # and the test has power: the unshifted logit-normal law is rejected for α = 8
    t8 = rfm.sample_time(20000, 8.0, g).double().numpy()
    assert stats.kstest(t8, lambda x: stats.norm.cdf(np.log(x) - np.log1p(-x))).pvalue < 1e-6


def test_noise():
    g = torch.Generator().manual_seed(0)
    z = rfm.noise((100, 4, 64), 8.0, "rfm", g)
    torch.testing.assert_close(z.norm(dim=-1), torch.full((100, 4), 8.0))
    e = rfm.noise((4000, 64), 8.0, "euclidean", g)
    assert abs(e.square().sum(-1).mean().item() - 64.0) < 1.5  # E‖z‖² = r²
    assert abs(e.std().item() - 1.0) < 0.02  # N(0, r²/C) per coordinate (= 1 at r = √C)


class GeodesicModel(torch.nn.Module):
    """v(z, t) = −logmap(z, p_y)/t: the exact velocity of the geodesic that reaches p_y at t = 0
    (for the null class, q). Records the times and batch sizes it is called with."""

    def __init__(self, p, q, num_classes, euclidean=False):
        super().__init__()
        self.p, self.q, self.num_classes, self.euclidean = p, q, num_classes, euclidean
        self.calls = []

    def forward(self, z, t, y):
        self.calls.append((t.clone(), y.clone()))
        b = z.shape[0]
        n = self.p.shape[0]
        target = torch.where((y == self.num_classes).reshape(-1, 1, 1),
                             self.q.repeat(b // n, 1, 1), self.p.repeat(b // n, 1, 1))
        tt = t.reshape(-1, 1, 1)
        if self.euclidean:
            return (z - target) / tt
        return -sphere.logmap(z, target, self.r) / tt


@pytest.mark.parametrize("path", ["rfm", "euclidean"])
def test_sampler_lands_on_target_of_exact_velocity(path):
    C, T, B = 64, 4, 5
    r = math.sqrt(C)
    p = _unit_points(B, T, C, r=r, seed=20)
    q = _unit_points(B, T, C, r=r, seed=21)
    model = GeodesicModel(p, q, num_classes=3, euclidean=path == "euclidean")
    model.r = r
    labels = torch.tensor([0, 1, 2, 0, 1])
    g = torch.Generator().manual_seed(0)
    alpha = rfm.alpha_for(T, C)
    for cfg_scale, expect in ((1.0, p), (0.0, q)):
        z = rfm.sample(model, labels, 7, cfg_scale, r, alpha, g, shape=(T, C), path=path)
        assert z.shape == (B, T, C)
        torch.testing.assert_close(z.norm(dim=-1), torch.full((B, T), r), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z, expect, rtol=0, atol=1e-4 * r)


def test_sampler_time_grid_and_guidance_interval():
    C, T, B, steps, alpha = 16, 4, 3, 6, 3.0
    r = math.sqrt(C)
    p = _unit_points(B, T, C, r=r, seed=30)
    model = GeodesicModel(p, p, num_classes=2)
    model.r = r
    labels = torch.tensor([0, 1, 1])
    rfm.sample(model, labels, steps, 4.0, r, alpha, shape=(T, C), guidance_interval=(0.0, 0.5))
    s = np.linspace(1.0, 0.0, steps + 1)[:-1]
    expected_t = alpha * s / (1 + (alpha - 1) * s)
    got_t = [c[0][0].item() for c in model.calls]
    np.testing.assert_allclose(got_t, expected_t, rtol=1e-6)
    for (t, y), te in zip(model.calls, expected_t, strict=True):
        assert (t == t[0]).all()
        if te <= 0.5:  # guided: conditional and null-class halves in one batch
            assert y.tolist() == [0, 1, 1, 2, 2, 2]
        else:
            assert y.tolist() == [0, 1, 1]


class ZeroModel(torch.nn.Module):
    num_classes = 2

    def forward(self, z, t, y):
        return torch.zeros_like(z)


def test_sampler_starts_from_generator_noise_on_the_sphere():
    C, T, r = 16, 4, 4.0
    y = torch.tensor([0, 1])
    a = rfm.sample(ZeroModel(), y, 3, 1.5, r, 2.0, torch.Generator().manual_seed(5), shape=(T, C))
    g = torch.randn(2, T, C, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, r * g / g.norm(dim=-1, keepdim=True))
    b = rfm.sample(ZeroModel(), y, 3, 1.5, r, 2.0, torch.Generator().manual_seed(6), shape=(T, C))
    assert not torch.allclose(a, b)
