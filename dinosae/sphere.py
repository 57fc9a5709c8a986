"""Manifold maths on the sphere of radius r: small pure functions on the last dimension.

Every function accepts any leading shape, works in fp32 even for fp16/bf16 inputs (fp64 stays
fp64) and returns that precision. Points are used by direction: an input slightly off the radius
is treated as its projection. `t` broadcasts from a scalar, shape (B,) or any leading prefix of
the points' shape.

Geometry through one frame per pair (x, y): the unit vector x̂, the unit tangent û at x̂ pointing
along the geodesic towards y, and the angle Ω between them. Then

    slerp(x, y, t)   = r·(cos(tΩ)·x̂ + sin(tΩ)·û)       (= [sin((1−t)Ω)x + sin(tΩ)y] / sin Ω)
    d/dt slerp       = rΩ·(−sin(tΩ)·x̂ + cos(tΩ)·û)
    logmap(x, y)     = rΩ·û,     geodesic_distance = rΩ

This form has no division by sin Ω, so identical, nearly identical and nearly antipodal points
and t ∈ {0, 1} are all finite. Ω = 2·atan2(‖x̂−ŷ‖, ‖x̂+ŷ‖) is accurate at both ends (arccos is
not). For exactly antipodal points the geodesic is not unique; a fixed tangent direction is used.
"""

from __future__ import annotations

import torch
from torch import Tensor

_TINY = 1e-30  # below this a tangent has no usable direction (exactly identical/antipodal)


def _f(x: Tensor) -> Tensor:
    """fp32 (or fp64 when given fp64)."""
    x = torch.as_tensor(x)
    return x.double() if x.dtype == torch.float64 else x.float()


def broadcast_time(t: float | Tensor, like: Tensor) -> Tensor:
    """Time as a tensor broadcastable against `like` (..., C): scalar, (B,) or a prefix shape."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.shape != like.shape[: t.ndim]:
        raise ValueError(f"t of shape {tuple(t.shape)} does not broadcast against points of "
                         f"shape {tuple(like.shape)}")
    return t.reshape(*t.shape, *([1] * (like.ndim - t.ndim)))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_TINY)


def _any_tangent(xh: Tensor) -> Tensor:
    """A fixed unit tangent at x̂: the basis vector where |x̂| is smallest, made orthogonal."""
    e = torch.zeros_like(xh).scatter_(-1, xh.abs().argmin(-1, keepdim=True), 1.0)
    return _unit(e - _dot(e, xh) * xh)


def _frame(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x̂, û, Ω): x̂ = x/‖x‖, û = unit tangent at x̂ towards y, Ω ∈ [0, π] (shape (..., 1))."""
    xh, yh = _unit(_f(x)), _unit(_f(y))
    xh, yh = torch.broadcast_tensors(xh, yh)
    omega = 2.0 * torch.atan2((xh - yh).norm(dim=-1, keepdim=True),
                              (xh + yh).norm(dim=-1, keepdim=True))
    u = yh - _dot(yh, xh) * xh
    u = u - _dot(u, xh) * xh  # second Gram-Schmidt pass: tangent to rounding even when ‖u‖ ≪ 1
    n = u.norm(dim=-1, keepdim=True)
    uh = torch.where(n > _TINY, u / n.clamp_min(_TINY), _any_tangent(xh))
    return xh, uh, omega


def project(x: Tensor, r: float = 1.0) -> Tensor:
    """x rescaled to norm r along the last dimension."""
    return r * _unit(_f(x))


def tangent(x: Tensor, v: Tensor, r: float = 1.0) -> Tensor:
    """The component of v orthogonal to x (the tangent space at x's direction; r is unused
    because only x's direction matters)."""
    xh, v = _unit(_f(x)), _f(v)
    return v - _dot(v, xh) * xh


def slerp(z0: Tensor, z1: Tensor, t: float | Tensor, r: float = 1.0) -> Tensor:
    """The point at time t on the geodesic from z0 (t=0) to z1 (t=1), on radius r."""
    xh, uh, omega = _frame(z0, z1)
    t = broadcast_time(t, xh)
    return r * (torch.cos(t * omega) * xh + torch.sin(t * omega) * uh)


def slerp_velocity(z0: Tensor, z1: Tensor, t: float | Tensor, r: float = 1.0) -> Tensor:
    """d/dt slerp(z0, z1, t, r): tangent at z_t, norm r·Ω."""
    xh, uh, omega = _frame(z0, z1)
    t = broadcast_time(t, xh)
    return r * omega * (torch.cos(t * omega) * uh - torch.sin(t * omega) * xh)


def slerp_and_velocity(z0: Tensor, z1: Tensor, t: float | Tensor,
                       r: float = 1.0) -> tuple[Tensor, Tensor]:
    """(slerp, slerp_velocity) from one computation of the frame."""
    xh, uh, omega = _frame(z0, z1)
    t = broadcast_time(t, xh)
    c, s = torch.cos(t * omega), torch.sin(t * omega)
    return r * (c * xh + s * uh), r * omega * (c * uh - s * xh)


def logmap(x: Tensor, y: Tensor, r: float = 1.0) -> Tensor:
    """The tangent vector at x whose exponential map reaches y; its norm is the distance rΩ."""
    _, uh, omega = _frame(x, y)
    return r * omega * uh


def expmap(x: Tensor, v: Tensor, r: float = 1.0) -> Tensor:
    """Follow the geodesic from x with initial velocity v for unit time (v's radial component
    is dropped first). z = r·cos θ·x̂ + r·sin θ·v̂ with θ = ‖v‖/r."""
    xh = _unit(_f(x))
    v = tangent(xh, v)
    n = v.norm(dim=-1, keepdim=True)
    theta = n / r
    sinc = torch.sinc(theta / torch.pi)  # sin θ / θ, equal to 1 at θ = 0
    return r * torch.cos(theta) * xh + sinc * v


def geodesic_distance(x: Tensor, y: Tensor, r: float = 1.0) -> Tensor:
    """Great-circle distance r·Ω, shape = the leading shape (last dimension reduced)."""
    _, _, omega = _frame(x, y)
    return r * omega.squeeze(-1)
