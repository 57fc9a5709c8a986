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


class ConstantModel(torch.nn.Module):
    """v = a for the classes, b for the null class (index num_classes)."""

    def __init__(self, a, b, num_classes=2):
        super().__init__()
        self.a, self.b, self.num_classes = a, b, num_classes

    def forward(self, z, t, y):
        null = (y == self.num_classes).reshape(-1, 1, 1)
        return torch.where(null, self.b.expand_as(z), self.a.expand_as(z))


def test_one_step_of_each_integrator():
    """From z1 with velocity a over dt = -1: euler_project = r·unit(z1 − a_tan); expmap =
    cos θ·z1 − r·sin θ·â_tan with θ = ‖a_tan‖/r (formulas written out here)."""
    C, T, r = 8, 3, 2.0
    z1 = _unit_points(1, T, C, r=r, seed=40)
    a = torch.randn(1, T, C, generator=torch.Generator().manual_seed(41))
    zhat = z1 / r
    a_tan = a - (a * zhat).sum(-1, keepdim=True) * zhat
    model = ConstantModel(a, a)
    y = torch.tensor([0])
    kw = dict(shape=(T, C), z1=z1)
    got = rfm.sample(model, y, 1, 1.0, r, 1.0, integrator="euler_project", **kw)
    e = z1 - a_tan
    torch.testing.assert_close(got, r * e / e.norm(dim=-1, keepdim=True))
    got = rfm.sample(model, y, 1, 1.0, r, 1.0, integrator="expmap", **kw)
    n = a_tan.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, torch.cos(n / r) * z1 - r * torch.sin(n / r) * a_tan / n)
    assert not torch.allclose(rfm.sample(model, y, 1, 1.0, r, 1.0, **kw), got)  # default: euler
    with pytest.raises(ValueError, match="unknown integrator"):
        rfm.sample(model, y, 1, 1.0, r, 1.0, integrator="rk4", **kw)


@pytest.mark.parametrize("integrator", ["expmap", "euler_project"])
def test_both_integrators_follow_the_geodesic_flow(integrator):
    C, T, B, r = 32, 2, 3, math.sqrt(32)
    p = _unit_points(B, T, C, r=r, seed=50)
    model = GeodesicModel(p, p, num_classes=3)
    model.r = r
    z = rfm.sample(model, torch.tensor([0, 1, 2]), 20, 1.0, r, 2.0, shape=(T, C),
                   integrator=integrator, generator=torch.Generator().manual_seed(1))
    # the exponential map follows the exact geodesic velocity exactly; Euler + projection
    # undershoots each step's angle (atan(f·θ) instead of f·θ) and closes in at the end
    atol = 1e-4 * r if integrator == "expmap" else 5e-3 * r
    torch.testing.assert_close(z, p, rtol=0, atol=atol)


def test_grid_end_and_guided_channels():
    C, T, B, steps, alpha = 16, 4, 3, 4, 2.0
    r = math.sqrt(C)
    p = _unit_points(B, T, C, r=r, seed=60)
    model = GeodesicModel(p, p, num_classes=2)
    model.r = r
    rfm.sample(model, torch.tensor([0, 1, 1]), steps, 1.0, r, alpha, shape=(T, C), t_end=0.2)
    s = np.linspace(1.0, 0.2, steps + 1)[:-1]
    np.testing.assert_allclose([c[0][0].item() for c in model.calls],
                               alpha * s / (1 + (alpha - 1) * s), rtol=1e-6)
    # guidance on the first 3 channels only: v = (w·1 + (1−w)·0) there, v_c = 1 elsewhere
    model = ConstantModel(torch.ones(1, 1, C), torch.zeros(1, 1, C))
    w = 4.0
    z = rfm.sample(model, torch.tensor([0, 1]), 1, w, r, 1.0, shape=(T, C),
                   z1=torch.zeros(2, T, C), path="euclidean", cfg_channels=3)
    v = torch.ones(C)
    v[:3] = w
    torch.testing.assert_close(z, (-r * v / v.norm()).expand(2, T, C))
