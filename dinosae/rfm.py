"""Flow matching on the token sphere: time sampling, paths, loss and the sampler.

Convention (DESIGN.md): z0 = data, z1 = noise, t = 1 is pure noise; each token is a point on the
sphere of radius r (R = √C for training). Two small path objects share one interface (noise,
interpolate, velocity, point_and_target, loss_at, step; as facebookresearch/flow_matching's
ProbPath), picked once by `flow_path(name, r)` from config dit.path; the module functions below
take the name:

* "rfm" (Riemannian flow matching, the paper): z1 = per-token Gaussian projected to radius r;
  z_t = slerp(z0, z1, t); target u_t = dz_t/dt (tangent at z_t). Loss: the prediction is split
  into a radial part (along ẑ_t) and a tangent part, L = mean‖v_tan − u_t‖² + λ_rad·mean‖v_rad‖².
  Sampler: the velocity projected to the tangent space, then one of two integrators
  (`integrator`): "euler_project", a plain Euler step projected back to radius r (the paper's
  choice: a summary of the paper reports it generating better than the rotation), or "expmap",
  the exponential map (a rotation along the geodesic).
* "euclidean" (rectified flow, the paper's baseline): z1 = Gaussian N(0, (r²/C)·I), i.e. the
  same expected norm r but not projected; z_t = (1−t)·z0 + t·z1; target z1 − z0; plain MSE.
  Sampler: Euler steps; the final tokens are projected to radius r (the data live there and the
  decoder only sees directions), so both paths return tokens on radius r.

"mean‖·‖²" is the mean over every element (batch, token and channel), i.e. a per-token squared
norm divided by C, the scale of F.mse_loss used by SiT/LightningDiT. All maths runs in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dinosae import sphere

PATHS = ("rfm", "euclidean")
INTEGRATORS = ("euler_project", "expmap")


# ---------------------------------------------------------------- time

def alpha_for(tokens: int, channels: int) -> float:
    """Dimension-dependent time shift α = √(N·C / 4096) (8 for 256 tokens × 1024 channels)."""
    return math.sqrt(tokens * channels / 4096)


def shift_time(t: Tensor, alpha: float) -> Tensor:
    """t ↦ α·t / (1 + (α−1)·t): fixes 0 and 1, pushes mass towards 1 (noise) for α > 1."""
    return alpha * t / (1.0 + (alpha - 1.0) * t)


def sample_time(n: int, alpha: float, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Tensor:
    """n times in (0, 1): t_base ~ LogitNormal(0, 1), then shifted by α. fp32, shape (n,)."""
    draw_on = generator.device if generator is not None else device
    t_base = torch.sigmoid(torch.randn(n, generator=generator, device=draw_on))
    return shift_time(t_base, alpha).to(device if device is not None else draw_on)


def time_grid(steps: int, alpha: float, device: torch.device | str | None = None,
              t_end: float = 0.0) -> Tensor:
    """The sampler's grid: `steps + 1` times from 1 to `t_end` (0: the data), uniform before
    the shift."""
    return shift_time(torch.linspace(1.0, t_end, steps + 1, device=device), alpha)


# ---------------------------------------------------------------- the two paths

class SpherePath:
    """Riemannian flow matching (the paper): noise = per-token Gaussian projected to radius r;
    z_t = slerp(z0, z1, t); u_t = dz_t/dt, tangent at z_t; loss on the tangent part of the
    prediction plus λ_rad times its radial part; steps stay on the sphere."""

    name = "rfm"

    def __init__(self, r: float) -> None:
        self.r = r

    def noise(self, g: Tensor) -> Tensor:
        return sphere.project(g, self.r)

    def interpolate(self, z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
        return sphere.slerp(z0, z1, t, self.r)

    def velocity(self, z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
        return sphere.slerp_velocity(z0, z1, t, self.r)

    def point_and_target(self, z0: Tensor, z1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return sphere.slerp_and_velocity(z0, z1, t, self.r)

    def loss_at(self, model_out: Tensor, zt: Tensor, u: Tensor,
                lambda_rad: float) -> tuple[Tensor, dict[str, Tensor]]:
        tan, rad = rfm_loss_at(model_out, zt, u)
        return tan + lambda_rad * rad, {"loss_tan": tan.detach(), "loss_rad": rad.detach()}

    def step(self, z: Tensor, v: Tensor, dt: float, integrator: str) -> Tensor:
        """One sampler step from z along the tangent part of v."""
        v = sphere.tangent(z, v)
        if integrator == "expmap":
            return sphere.project(sphere.expmap(z, dt * v, self.r), self.r)
        return sphere.project(z + dt * v, self.r)  # euler_project


class EuclideanPath:
    """Rectified flow (the paper's baseline): noise = Gaussian N(0, (r²/C)·I), the same expected
    norm r, not projected; z_t = (1−t)·z0 + t·z1; u_t = z1 − z0; plain MSE; Euler steps."""

    name = "euclidean"

    def __init__(self, r: float) -> None:
        self.r = r

    def noise(self, g: Tensor) -> Tensor:
        return g * (self.r / math.sqrt(g.shape[-1]))

    def interpolate(self, z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
        z0, z1 = z0.float(), z1.float()
        t = sphere.broadcast_time(t, z0)
        return (1.0 - t) * z0 + t * z1

    def velocity(self, z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
        return z1.float() - z0.float()

    def point_and_target(self, z0: Tensor, z1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.interpolate(z0, z1, t), self.velocity(z0, z1, t)

    def loss_at(self, model_out: Tensor, zt: Tensor, u: Tensor,
                lambda_rad: float) -> tuple[Tensor, dict[str, Tensor]]:
        return (model_out.float() - u).square().mean(), {}

    def step(self, z: Tensor, v: Tensor, dt: float, integrator: str) -> Tensor:
        return z + dt * v


FlowPath = SpherePath | EuclideanPath
PATH_CLASSES: dict[str, type] = {"rfm": SpherePath, "euclidean": EuclideanPath}


def flow_path(path: str, r: float) -> FlowPath:
    """The path object named by config dit.path ("rfm" | "euclidean") at radius r."""
    if path not in PATH_CLASSES:
        raise ValueError(f"unknown flow path {path!r}; expected one of {PATHS}")
    return PATH_CLASSES[path](r)


def noise(shape: Sequence[int], r: float, path: str = "rfm",
          generator: torch.Generator | None = None,
          device: torch.device | str | None = None) -> Tensor:
    """z1: per-token Gaussian, projected to radius r ("rfm") or scaled to E‖z‖² = r²
    ("euclidean")."""
    fp = flow_path(path, r)
    draw_on = generator.device if generator is not None else device
    g = torch.randn(*shape, generator=generator, device=draw_on)
    return fp.noise(g.to(device if device is not None else draw_on))


def interpolate(z0: Tensor, z1: Tensor, t: Tensor, r: float, path: str = "rfm") -> Tensor:
    """z_t on the chosen path (fp32)."""
    return flow_path(path, r).interpolate(z0, z1, t)


# ---------------------------------------------------------------- losses

def point_and_target(z0: Tensor, z1: Tensor, t: Tensor, r: float,
                     path: str = "rfm") -> tuple[Tensor, Tensor]:
    """(z_t, u_t) on the chosen path, the path computed once (fp32)."""
    return flow_path(path, r).point_and_target(z0, z1, t)


def rfm_loss_at(model_out: Tensor, zt: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """(mean‖v_tan − u‖², mean‖v_rad‖²) with v split at z_t into radial and tangent parts."""
    v = model_out.float()
    v_tan = sphere.tangent(zt, v)
    v_rad = v - v_tan
    return (v_tan - u).square().mean(), v_rad.square().mean()


def rfm_loss_parts(model_out: Tensor, z0: Tensor, z1: Tensor, t: Tensor,
                   r: float) -> tuple[Tensor, Tensor]:
    """(mean‖v_tan − u_t‖², mean‖v_rad‖²) with v split at z_t into radial and tangent parts."""
    return rfm_loss_at(model_out, *sphere.slerp_and_velocity(z0, z1, t, r))


def rfm_loss(model_out: Tensor, z0: Tensor, z1: Tensor, t: Tensor, r: float,
             lambda_rad: float = 0.1) -> Tensor:
    """L = mean‖v_tan − u_t‖² + λ_rad·mean‖v_rad‖² (scalar, fp32)."""
    tan, rad = rfm_loss_parts(model_out, z0, z1, t, r)
    return tan + lambda_rad * rad


def euclidean_loss(model_out: Tensor, z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """Rectified-flow MSE against z1 − z0 (scalar, fp32); t is unused (constant target)."""
    return (model_out.float() - (z1.float() - z0.float())).square().mean()


def flow_loss(model_out: Tensor, z0: Tensor, z1: Tensor, t: Tensor, r: float,
              path: str = "rfm", lambda_rad: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, parts for logging) for either path."""
    fp = flow_path(path, r)
    return fp.loss_at(model_out, *fp.point_and_target(z0, z1, t), lambda_rad)


def flow_loss_at(model_out: Tensor, zt: Tensor, u: Tensor, path: str = "rfm",
                 lambda_rad: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """flow_loss given the path's point z_t and target u_t (`point_and_target`); the radius
    is not needed (z_t carries it)."""
    return flow_path(path, 1.0).loss_at(model_out, zt, u, lambda_rad)


# ---------------------------------------------------------------- sampler

Model = Callable[[Tensor, Tensor, Tensor], Tensor]


def _guided_velocity(model: Model, z: Tensor, t: float, labels: Tensor, null: int,
                     cfg_scale: float, guide: bool, amp: bool,
                     cfg_channels: int | None = None) -> Tensor:
    """v = v_u + w·(v_c − v_u) (one batched call), or v_c alone when not guiding; with
    `cfg_channels` = k, guided on the first k channels only (v_c on the others)."""
    b = z.shape[0]
    if guide:
        z_in = torch.cat([z, z])
        y_in = torch.cat([labels, torch.full_like(labels, null)])
    else:
        z_in, y_in = z, labels
    t_in = torch.full((z_in.shape[0],), t, device=z.device, dtype=torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and z.is_cuda):
        v = model(z_in, t_in, y_in)
    v = v.float()
    if not guide:
        return v
    v_c, v_u = v[:b], v[b:]
    guided = v_u + cfg_scale * (v_c - v_u)
    if cfg_channels is None:
        return guided
    return torch.cat([guided[..., :cfg_channels], v_c[..., cfg_channels:]], dim=-1)


@torch.no_grad()
def sample(model: Model, labels: Tensor, steps: int, cfg_scale: float, r: float, alpha: float,
           generator: torch.Generator | None = None, *, shape: Sequence[int] | None = None,
           guidance_interval: Sequence[float] = (0.0, 1.0), path: str = "rfm",
           amp: bool = False, z1: Tensor | None = None, integrator: str = "euler_project",
           t_end: float = 0.0, cfg_channels: int | None = None) -> Tensor:
    """Integrate from noise (t = 1) to data (t = 0) on the shifted grid; tokens (B, T, C) fp32
    on radius r.

    The model is called as model(z (B,T,C) fp32, t (B,), y (B,) int64); the null class is
    `model.num_classes`. Classifier-free guidance with scale `cfg_scale` is applied at the steps
    whose current time t lies in `guidance_interval` = (lo, hi) (t = 1 is noise); a scale of 1
    means no guidance. `shape` = (T, C), by default (model.tokens, model.channels). `amp` runs
    the network under bf16 autocast on CUDA. `z1` replaces the drawn starting noise.
    `integrator` (path "rfm"): "euler_project" (z <- project(z + dt·v_tan, r)) or "expmap"
    (z <- expmap(z, dt·v_tan)); the Euclidean path always takes plain Euler steps. `t_end` and
    `cfg_channels` reproduce another code's sampler (dinosae.models.dit.CONVENTIONS): the grid
    stops at t_end, guidance acts on the first cfg_channels channels only.
    """
    fp = flow_path(path, r)
    if integrator not in INTEGRATORS:
        raise ValueError(f"unknown integrator {integrator!r}; expected one of {INTEGRATORS}")
    labels = labels.long()
    device = labels.device
    if shape is None:
        if not hasattr(model, "tokens"):
            raise ValueError("give shape=(T, C): the model has no .tokens/.channels")
        shape = (model.tokens, model.channels)
    if z1 is None:
        z = noise((labels.shape[0], *shape), r, path, generator, device=device)
    else:
        z = z1.float().to(device)
    null = int(getattr(model, "num_classes", -1))
    lo, hi = guidance_interval
    grid = time_grid(steps, alpha, t_end=t_end).tolist()
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        guide = cfg_scale != 1.0 and lo <= t <= hi
        if guide and null < 0:
            raise ValueError("classifier-free guidance needs model.num_classes (the null class)")
        v = _guided_velocity(model, z, t, labels, null, cfg_scale, guide, amp, cfg_channels)
        z = fp.step(z, v, t_next - t, integrator)  # dt < 0: integrating towards the data
    return sphere.project(z, r)
