"""dinosae.sphere against independent computations: finite differences, the textbook slerp and
arccos formulas in float64, and edge cases that must stay finite."""

from __future__ import annotations

import math

import pytest
import torch

from dinosae import sphere

R = 2.5


def _points(*shape: int, r: float = R, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    return r * x / x.norm(dim=-1, keepdim=True)


def _textbook(z0, z1, t, r):
    """DESIGN.md's formulas with Ω = arccos(<z0,z1>/r²) (float64, generic points only)."""
    omega = torch.arccos(((z0 * z1).sum(-1, keepdim=True) / r**2).clamp(-1, 1))
    t = t.reshape(-1, *([1] * (z0.ndim - 1)))
    zt = (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)
    ut = omega / torch.sin(omega) * (torch.cos(t * omega) * z1 - torch.cos((1 - t) * omega) * z0)
    return zt, ut, omega.squeeze(-1)


def test_slerp_and_velocity_match_textbook_formulas():
    z0, z1 = _points(4, 3, 16, seed=1), _points(4, 3, 16, seed=2)
    t = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=torch.float64)
    zt, ut, omega = _textbook(z0, z1, t, R)
    torch.testing.assert_close(sphere.slerp(z0, z1, t, R), zt, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sphere.slerp_velocity(z0, z1, t, R), ut, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sphere.geodesic_distance(z0, z1, R), R * omega)


def test_velocity_is_central_finite_difference_of_slerp():
    z0, z1 = _points(5, 7, 32, seed=3), _points(5, 7, 32, seed=4)
    t = torch.tensor([0.05, 0.3, 0.5, 0.81, 0.97], dtype=torch.float64)
    h = 1e-6
    fd = (sphere.slerp(z0, z1, t + h, R) - sphere.slerp(z0, z1, t - h, R)) / (2 * h)
    v = sphere.slerp_velocity(z0, z1, t, R)
    torch.testing.assert_close(v, fd, rtol=1e-7, atol=1e-7)


def test_velocity_tangent_and_slerp_on_radius():
    z0, z1 = _points(6, 4, 64, seed=5, dtype=torch.float32), _points(6, 4, 64, seed=6,
                                                                     dtype=torch.float32)
    for t in (torch.rand(6), torch.zeros(6), torch.ones(6), 0.5):
        zt = sphere.slerp(z0, z1, t, R)
        v = sphere.slerp_velocity(z0, z1, t, R)
        torch.testing.assert_close(zt.norm(dim=-1), torch.full((6, 4), R), rtol=1e-6, atol=1e-6)
        cos = (zt * v).sum(-1) / (zt.norm(dim=-1) * v.norm(dim=-1))
        assert cos.abs().max() < 1e-5
    # endpoints are the inputs
    torch.testing.assert_close(sphere.slerp(z0, z1, 0.0, R), z0, rtol=0, atol=1e-5)
    torch.testing.assert_close(sphere.slerp(z0, z1, 1.0, R), z1, rtol=0, atol=1e-5)


def test_expmap_logmap_roundtrip_and_distance():
    x, y = _points(3, 5, 24, seed=7), _points(3, 5, 24, seed=8)
    v = sphere.logmap(x, y, R)
    torch.testing.assert_close(sphere.expmap(x, v, R), y, rtol=1e-10, atol=1e-10)
    # ‖logmap‖ is the distance, and the distance is the textbook arccos one
    d = R * torch.arccos(((x * y).sum(-1) / R**2).clamp(-1, 1))
    torch.testing.assert_close(sphere.geodesic_distance(x, y, R), v.norm(dim=-1))
    torch.testing.assert_close(sphere.geodesic_distance(x, y, R), d)
    # logmap inverts expmap for tangent vectors shorter than the cut locus (πr)
    w = sphere.tangent(x, torch.randn(3, 5, 24, dtype=torch.float64))
    w = w / w.norm(dim=-1, keepdim=True) * torch.linspace(0.1, 3.0, 5, dtype=torch.float64)[:, None]
    torch.testing.assert_close(sphere.logmap(x, sphere.expmap(x, w, R), R), w)


def test_project_and_tangent():
    x = torch.randn(4, 9, dtype=torch.float64)
    v = torch.randn(4, 9, dtype=torch.float64)
    p = sphere.project(x, 3.0)
    torch.testing.assert_close(p.norm(dim=-1), torch.full((4,), 3.0, dtype=torch.float64))
    torch.testing.assert_close(p / 3.0, x / x.norm(dim=-1, keepdim=True))
    tv = sphere.tangent(x, v, 3.0)
    assert ((tv * x).sum(-1).abs() < 1e-12).all()
    # v - tangent(v) is parallel to x: its component orthogonal to x vanishes
    rad = v - tv
    xh = x / x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(rad, (v * xh).sum(-1, keepdim=True) * xh)


def _all_finite(*ts: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


@pytest.mark.parametrize("case", ["identical", "nearly_identical", "nearly_antipodal",
                                  "antipodal"])
def test_edge_cases_are_finite_and_correct(case):
    torch.manual_seed(0)
    C = 1024
    x = sphere.project(torch.randn(8, C), R)
    if case == "identical":
        y, omega = x.clone(), 0.0
    elif case == "nearly_identical":
        d = sphere.tangent(x, torch.randn(8, C))
        y = sphere.project(x + 5e-7 * R * d / d.norm(dim=-1, keepdim=True), R)
        omega = None
    elif case == "nearly_antipodal":
        d = sphere.tangent(x, torch.randn(8, C))
        y = sphere.project(-x + 1e-4 * R * d / d.norm(dim=-1, keepdim=True), R)
        omega = math.pi - 1e-4
    else:
        y, omega = -x, math.pi
    for t in (torch.zeros(8), torch.ones(8), torch.rand(8)):
        zt = sphere.slerp(x, y, t, R)
        v = sphere.slerp_velocity(x, y, t, R)
        lg = sphere.logmap(x, y, R)
        ex = sphere.expmap(x, lg, R)
        dist = sphere.geodesic_distance(x, y, R)
        assert _all_finite(zt, v, lg, ex, dist), case
        torch.testing.assert_close(zt.norm(dim=-1), torch.full((8,), R), rtol=1e-5, atol=1e-5)
        assert ((zt * v).sum(-1).abs() <= 1e-4 * R * (v.norm(dim=-1) + 1)).all()
    torch.testing.assert_close(sphere.slerp(x, y, 0.0, R), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(sphere.slerp(x, y, 1.0, R), y, rtol=0, atol=2e-4)
    if omega is not None:
        torch.testing.assert_close(dist, torch.full((8,), R * omega), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(sphere.slerp_velocity(x, y, 0.3, R).norm(dim=-1),
                                   torch.full((8,), R * omega), rtol=1e-4, atol=1e-6)
    if case == "nearly_identical":
        # to first order logmap(x, y) = y − x, and the distance is ‖y − x‖
        torch.testing.assert_close(lg, y - x, rtol=0, atol=1e-6)
        torch.testing.assert_close(dist, (y - x).norm(dim=-1), rtol=1e-2, atol=1e-7)
    torch.testing.assert_close(sphere.expmap(x, torch.zeros_like(x), R), x)


def test_low_precision_inputs_are_computed_in_fp32():
    z0 = _points(4, 8, 256, seed=9, dtype=torch.float32)
    z1 = _points(4, 8, 256, seed=10, dtype=torch.float32)
    t = torch.rand(4)
    for dt in (torch.float16, torch.bfloat16):
        a, b = z0.to(dt), z1.to(dt)
        for fn in (sphere.slerp, sphere.slerp_velocity):
            out = fn(a, b, t.to(dt), R)
            assert out.dtype == torch.float32
            # identical to the fp32 maths on the same (rounded) inputs
            torch.testing.assert_close(out, fn(a.float(), b.float(), t.to(dt).float(), R),
                                       rtol=0, atol=0)
        assert sphere.logmap(a, b, R).dtype == torch.float32
        assert sphere.expmap(a, sphere.tangent(a, b), R).dtype == torch.float32
        # fp16 arithmetic would lose the radius: ‖·‖ stays R to fp32 precision instead
        zt = sphere.slerp(a, b, t, R)
        assert (zt.norm(dim=-1) - R).abs().max() < 1e-5


def test_time_broadcasting():
    z0, z1 = _points(3, 5, 8, seed=11), _points(3, 5, 8, seed=12)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    batched = sphere.slerp(z0, z1, t, R)
    for i in range(3):
        torch.testing.assert_close(batched[i], sphere.slerp(z0[i], z1[i], float(t[i]), R))
    with pytest.raises(ValueError, match="broadcast"):
        sphere.slerp(z0, z1, torch.rand(4), R)
