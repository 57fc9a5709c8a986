"""The training objective as training computes it, against float64 textbook formulas written
here (not the package's sphere maths): slerp z_t = [sin((1−t)Ω)·z0 + sin(tΩ)·z1] / sin Ω, its
velocity u_t = dz_t/dt (also checked by finite differences), and the loss on a prediction v split
at z_t into a radial part (v·ẑ)ẑ and a tangent part, L = mean‖v_tan − u‖² + λ·mean‖v_rad‖².

Covered: sphere.slerp_and_velocity, SpherePath/EuclideanPath.point_and_target, rfm.flow_loss_at
(what train_dit calls) and train/dit.train_step end to end with a DiT whose output is not zero.
Convention (DESIGN.md): z0 = data at t = 0, z1 = noise at t = 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinosae import rfm, sphere
from dinosae.models.dit import build_dit
from dinosae.train import dit as TD


def _points(*shape: int, r: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return r * x / x.norm(dim=-1, keepdim=True)


def textbook_slerp(z0: np.ndarray, z1: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, ...]:
    """(z_t, u_t) in float64 numpy from the closed forms; z0, z1 on the same radius, t (B,)."""
    r = np.linalg.norm(z0, axis=-1, keepdims=True)
    cos = np.clip(np.sum(z0 * z1, -1, keepdims=True) / (r * r), -1.0, 1.0)
    om = np.arccos(cos)
    t = t.reshape(-1, *([1] * (z0.ndim - 1)))
    zt = (np.sin((1 - t) * om) * z0 + np.sin(t * om) * z1) / np.sin(om)
    ut = om * (np.cos(t * om) * z1 - np.cos((1 - t) * om) * z0) / np.sin(om)
    return zt, ut


def textbook_loss(v: np.ndarray, zt: np.ndarray, u: np.ndarray, lam: float) -> tuple[float, ...]:
    """(total, tangent, radial) of mean‖v_tan − u‖² + λ·mean‖v_rad‖², means over elements."""
    zh = zt / np.linalg.norm(zt, axis=-1, keepdims=True)
    v_rad = np.sum(v * zh, -1, keepdims=True) * zh
    v_tan = v - v_rad
    tan, rad = np.mean((v_tan - u) ** 2), np.mean(v_rad ** 2)
    return tan + lam * rad, tan, rad


B, T, C = 5, 3, 16
R = 4.0  # sqrt(C): the training radius


@pytest.fixture
def pair():
    z0 = _points(B, T, C, r=R, seed=1)  # data
    z1 = _points(B, T, C, r=R, seed=2)  # noise
    t = torch.tensor([0.03, 0.3, 0.5, 0.71, 0.97], dtype=torch.float64)  # one per sample
    return z0, z1, t


def test_slerp_and_velocity_against_textbook_and_finite_differences(pair):
    z0, z1, t = pair
    zt, ut = sphere.slerp_and_velocity(z0, z1, t, R)
    ezt, eut = textbook_slerp(z0.numpy(), z1.numpy(), t.numpy())
    np.testing.assert_allclose(zt.numpy(), ezt, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ut.numpy(), eut, rtol=0, atol=1e-9)
    # the velocity is the time derivative of the point (central differences of the textbook)
    h = 1e-6
    plus, _ = textbook_slerp(z0.numpy(), z1.numpy(), t.numpy() + h)
    minus, _ = textbook_slerp(z0.numpy(), z1.numpy(), t.numpy() - h)
    np.testing.assert_allclose(ut.numpy(), (plus - minus) / (2 * h), rtol=0, atol=1e-6)
    # fp32 inputs: the same numbers to fp32 accuracy, on radius R
    zt32, ut32 = sphere.slerp_and_velocity(z0.float(), z1.float(), t.float(), R)
    assert zt32.dtype == torch.float32
    np.testing.assert_allclose(zt32.numpy(), ezt, atol=2e-5)
    np.testing.assert_allclose(ut32.numpy(), eut, atol=5e-5)
    # the radius is R even when the inputs sit elsewhere (points are used by direction)
    zt_s, ut_s = sphere.slerp_and_velocity(0.5 * z0, 3.0 * z1, t, R)
    np.testing.assert_allclose(zt_s.numpy(), ezt, atol=1e-10)
    np.testing.assert_allclose(ut_s.numpy(), eut, atol=1e-9)


def test_sphere_path_point_and_target_is_data_at_0_noise_at_1(pair):
    z0, z1, t = pair
    ezt, eut = textbook_slerp(z0.numpy(), z1.numpy(), t.numpy())
    path = rfm.flow_path("rfm", R)
    for zt, ut in (path.point_and_target(z0.float(), z1.float(), t.float()),
                   rfm.point_and_target(z0.float(), z1.float(), t.float(), R, "rfm")):
        np.testing.assert_allclose(zt.numpy(), ezt, atol=2e-5)
        np.testing.assert_allclose(ut.numpy(), eut, atol=5e-5)
    # the ends: data at t = 0, noise at t = 1 (a swapped pair passes neither)
    for tt, want in ((0.0, z0), (1.0, z1)):
        zt, _ = path.point_and_target(z0.float(), z1.float(), torch.full((B,), tt))
        np.testing.assert_allclose(zt.numpy(), want.numpy(), atol=2e-5)
    # noise: a Gaussian projected to radius R
    g = torch.randn(4, T, C)
    np.testing.assert_allclose(path.noise(g).numpy(),
                               (R * g / g.norm(dim=-1, keepdim=True)).numpy(), atol=1e-5)


def test_euclidean_path_point_and_target_against_definition(pair):
    z0, z1, t = pair
    zt, ut = rfm.flow_path("euclidean", R).point_and_target(z0.float(), z1.float(), t.float())
    tt = t.reshape(-1, 1, 1)
    np.testing.assert_allclose(zt.numpy(), ((1 - tt) * z0 + tt * z1).numpy(), atol=1e-5)
    np.testing.assert_allclose(ut.numpy(), (z1 - z0).numpy(), atol=1e-5)
    g = torch.randn(2000, 1, C, generator=torch.Generator().manual_seed(3))
    n = rfm.flow_path("euclidean", R).noise(g)
    np.testing.assert_allclose(n.numpy(), (g * R / math.sqrt(C)).numpy(), atol=1e-6)


@pytest.mark.parametrize("lam", [0.1, 0.37, 2.0])
def test_flow_loss_at_is_tangent_error_plus_lambda_radial(pair, lam):
    z0, z1, t = pair
    ezt, eut = textbook_slerp(z0.numpy(), z1.numpy(), t.numpy())
    # a prediction with both a tangent error and a radial part (random, not built from u)
    v = torch.randn(B, T, C, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    zh = torch.from_numpy(ezt / np.linalg.norm(ezt, axis=-1, keepdims=True))
    a = 4.0 * torch.randn(B, T, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v = v + torch.from_numpy(eut) + a * zh
    total, tan, rad = textbook_loss(v.numpy(), ezt, eut, lam)
    assert rad > 0.1 * tan  # both parts matter at this scale
    zt, ut = rfm.point_and_target(z0.float(), z1.float(), t.float(), R, "rfm")
    loss, parts = rfm.flow_loss_at(v.float(), zt, ut, "rfm", lam)
    assert loss.item() == pytest.approx(total, rel=1e-5)
    assert parts["loss_tan"].item() == pytest.approx(tan, rel=1e-5)
    assert parts["loss_rad"].item() == pytest.approx(rad, rel=1e-5)
    # the Euclidean loss is plain MSE against u
    loss_e, parts_e = rfm.flow_loss_at(v.float(), zt, ut, "euclidean", lam)
    assert loss_e.item() == pytest.approx(np.mean((v.numpy() - ut.double().numpy()) ** 2),
                                          rel=1e-5)
    assert parts_e == {}


def _busy_dit(seed: int = 0) -> torch.nn.Module:
    """The tiny DiT with every weight perturbed: adaLN-zero would make its output exactly 0,
    which no objective bug can change."""
    torch.manual_seed(seed)
    model = build_dit("tiny", 4, C, 3, (2, 2))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("path", ["rfm", "euclidean"])
def test_train_step_loss_is_the_textbook_loss_of_the_network_output(path):
    lam = 0.37
    torch.set_num_threads(1)
    z0 = _points(4, 4, C, r=R, seed=5).float()
    z1 = rfm.noise(z0.shape, R, path, torch.Generator().manual_seed(6))
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    y = torch.tensor([0, 2, 3, 1])  # 3 = the null class
    model = _busy_dit()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay as they are
    # independently: the network at the textbook point, the textbook loss of its output
    if path == "rfm":
        ezt, eut = textbook_slerp(z0.double().numpy(), z1.double().numpy(), t.double().numpy())
    else:
        tt = t.double().reshape(-1, 1, 1)
        ezt = ((1 - tt) * z0.double() + tt * z1.double()).numpy()
        eut = (z1.double() - z0.double()).numpy()
    with torch.no_grad():
        out = model(torch.from_numpy(ezt).float(), t, y).double().numpy()
    assert np.abs(out).mean() > 0.05  # the network's output matters
    res = TD.train_step(model, opt, z0, z1, t, y, r=R, path=path, lambda_rad=lam,
                        grad_clip=1e9)
    if path == "rfm":
        total, tan, rad = textbook_loss(out, ezt, eut, lam)
        assert res["loss_tan"] == pytest.approx(tan, rel=1e-4)
        assert res["loss_rad"] == pytest.approx(rad, rel=1e-4)
    else:
        total = np.mean((out - eut) ** 2)
    assert res["ok"] and res["loss"] == pytest.approx(total, rel=1e-4)


def test_train_step_gradient_is_the_textbook_losss_gradient():
    """The update direction: after one SGD step of size lr, the weights moved by −lr·∇L of the
    textbook loss (computed here with autograd on our own formula)."""
    lam, lr = 0.5, 1e-2
    torch.set_num_threads(1)
    z0 = _points(4, 4, C, r=R, seed=7).float()
    z1 = rfm.noise(z0.shape, R, "rfm", torch.Generator().manual_seed(8))
    t = torch.tensor([0.2, 0.35, 0.55, 0.8])
    y = torch.tensor([0, 1, 2, 0])
    model = _busy_dit(1)
    ref = _busy_dit(1)
    ezt, eut = textbook_slerp(z0.double().numpy(), z1.double().numpy(), t.double().numpy())
    zt, u = torch.from_numpy(ezt).float(), torch.from_numpy(eut).float()
    v = ref(zt, t, y)
    zh = zt / zt.norm(dim=-1, keepdim=True)
    v_rad = (v * zh).sum(-1, keepdim=True) * zh
    loss = ((v - v_rad) - u).square().mean() + lam * v_rad.square().mean()
    loss.backward()
    TD.train_step(model, torch.optim.SGD(model.parameters(), lr=lr), z0, z1, t, y, r=R,
                  path="rfm", lambda_rad=lam, grad_clip=1e9)
    moved = 0.0
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        want = q.detach() - lr * (q.grad if q.grad is not None else 0.0)
        torch.testing.assert_close(p.detach(), want, rtol=1e-4, atol=1e-6, msg=name)
        moved += float((p.detach() - q.detach()).abs().sum())
    assert moved > 1e-3
