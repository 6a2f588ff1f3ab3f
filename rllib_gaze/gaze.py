"""Attention over a CNN feature map: the foveal Gaussian "gaze" and the unconstrained patch arm.

Both modules take a feature map ``(B, C, H, W)`` and return ``(attended, params)`` where
``attended`` has the input's shape and every channel of a cell is multiplied by the same weight.

Coordinates are normalised: cell centres lie in ``(-1, 1)`` on both axes, x along W, y along H,
so a sigma of 1.0 spans half the map whatever its resolution.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Order of the 5 foveal parameters in every ``(B, 5)`` tensor this package passes around.
GAZE_PARAM_NAMES = ("mu_x", "mu_y", "sigma_x", "sigma_y", "sigma_xy")

# Pre-activation values are clamped here before squashing: tanh/softplus saturate long before,
# and the clamp keeps sigma bounded (so the map stays finite) whatever the feature map holds.
_RAW_LIMIT = 30.0


def cell_centres(height: int, width: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised coordinates of the cell centres: ``ys (H,)`` and ``xs (W,)`` in ``(-1, 1)``."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * (2.0 / height) - 1.0
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * (2.0 / width) - 1.0
    return ys, xs


def gaussian_map(params: torch.Tensor, height: int, width: int, floor: float = 0.0) -> torch.Tensor:
    """Draw the gaze map of each observation from its Gaussian parameters.

    Args:
        params: ``(B, 5)`` = (mu_x, mu_y, sigma_x, sigma_y, sigma_xy) in normalised coordinates;
            the covariance ``[[sx^2, sxy], [sxy, sy^2]]`` must be positive definite.
        height, width: grid size of the map.
        floor: every weight is ``floor + (1 - floor) * g`` so no cell is ever zeroed.

    Returns:
        ``(B, H, W)`` weights; the unnormalised Gaussian ``g`` is 1 at the centre (peak = 1).
    """
    mu_x, mu_y, sx, sy, sxy = params.unbind(-1)
    ys, xs = cell_centres(height, width, device=params.device, dtype=params.dtype)
    dx = xs.view(1, 1, width) - mu_x.view(-1, 1, 1)
    dy = ys.view(1, height, 1) - mu_y.view(-1, 1, 1)
    sx, sy = sx.view(-1, 1, 1), sy.view(-1, 1, 1)
    rho = (sxy.view(-1, 1, 1) / (sx * sy)).clamp(-0.999, 0.999)
    zx, zy = dx / sx, dy / sy
    mahalanobis_sq = (zx * zx - 2.0 * rho * zx * zy + zy * zy) / (1.0 - rho * rho)
    g = torch.exp(-0.5 * mahalanobis_sq)
    return floor + (1.0 - floor) * g


class _MapHead(nn.Module):
    """Feature map ``(B, C, H, W)`` -> ``(B, out_dim)``: 1x1 conv to few channels, then an MLP.

    The 1x1 reduction keeps the spatial layout (a centre needs to know *where* things are) while
    keeping the head small next to the encoder.
    """

    def __init__(self, in_channels: int, height: int, width: int, out_dim: int,
                 reduced_channels: int = 8, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, reduced_channels, 1), nn.ReLU(), nn.Flatten(),
            nn.Linear(reduced_channels * height * width, hidden), nn.ReLU(),
        )
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        raw = self.out(self.body(features))
        return torch.nan_to_num(raw).clamp(-_RAW_LIMIT, _RAW_LIMIT)


class FovealGaze(nn.Module):
    """One 2-D Gaussian per observation, predicted from the feature map, multiplied into it.

    Parameterisation (METHOD.md defaults): centre ``tanh`` in ``(-1, 1)``; each sigma is
    ``softplus + sigma_min``; correlation ``rho = rho_max * tanh`` and ``sigma_xy = rho * sx * sy``,
    so the covariance is positive definite for any input. The head starts at a centred gaze of
    spread ``init_sigma`` (wide: nothing is hidden before learning starts).

    Input ``(B, C, H, W)``; output ``attended (B, C, H, W)`` and ``params (B, 5)``.
    """

    def __init__(self, in_channels: int, height: int, width: int, *, floor: float = 0.0,
                 sigma_min: float = 0.05, init_sigma: float = 1.0, rho_max: float = 0.9):
        super().__init__()
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"floor={floor!r}: must be in [0, 1)")
        if not 0.0 < sigma_min < init_sigma:
            raise ValueError(f"sigma_min={sigma_min!r}, init_sigma={init_sigma!r}: need 0 < sigma_min < init_sigma")
        if not 0.0 <= rho_max < 1.0:
            raise ValueError(f"rho_max={rho_max!r}: must be in [0, 1)")
        self.height, self.width = height, width
        self.floor, self.sigma_min, self.rho_max = floor, sigma_min, rho_max
        self.head = _MapHead(in_channels, height, width, out_dim=5)
        # Small weights + a bias that decodes to (0, 0, init_sigma, init_sigma, 0).
        nn.init.normal_(self.head.out.weight, std=1e-3)
        softplus_inv = math.log(math.expm1(init_sigma - sigma_min))
        with torch.no_grad():
            self.head.out.bias.copy_(torch.tensor([0.0, 0.0, softplus_inv, softplus_inv, 0.0]))

    def params_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """``(B, 5)`` unconstrained head outputs -> ``(B, 5)`` valid Gaussian parameters."""
        mu = torch.tanh(raw[:, 0:2])
        sigma = nn.functional.softplus(raw[:, 2:4]) + self.sigma_min
        rho = self.rho_max * torch.tanh(raw[:, 4])
        sxy = rho * sigma[:, 0] * sigma[:, 1]
        return torch.cat([mu, sigma, sxy.unsqueeze(-1)], dim=-1)

    def attention_map(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> weights ``(B, H, W)`` and params ``(B, 5)``."""
        params = self.params_from_raw(self.head(features))
        return gaussian_map(params, self.height, self.width, self.floor), params

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, params = self.attention_map(features)
        return features * weights.unsqueeze(1), params


class PatchGaze(nn.Module):
    """Unconstrained attention: one free weight in ``(floor, 1)`` per cell, predicted per observation.

    The paper's comparison arm for the foveal constraint. Initialised near-uniform (weights ~0.88).
    Input ``(B, C, H, W)``; output ``attended (B, C, H, W)`` and ``params (B, H, W)`` (the weights).
    """

    def __init__(self, in_channels: int, height: int, width: int, *, floor: float = 0.0):
        super().__init__()
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"floor={floor!r}: must be in [0, 1)")
        self.height, self.width, self.floor = height, width, floor
        self.head = _MapHead(in_channels, height, width, out_dim=height * width)
        nn.init.normal_(self.head.out.weight, std=1e-3)
        nn.init.constant_(self.head.out.bias, 2.0)

    def attention_map(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> weights ``(B, H, W)``, twice (the weights are the parameters)."""
        logits = self.head(features).view(-1, self.height, self.width)
        weights = self.floor + (1.0 - self.floor) * torch.sigmoid(logits)
        return weights, weights

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, _ = self.attention_map(features)
        return features * weights.unsqueeze(1), weights


ATTENTION_MODES = ("foveal", "patch", "none")


def build_gaze(attention: str, in_channels: int, height: int, width: int, *, floor: float = 0.0,
               sigma_min: float = 0.05, init_sigma: float = 1.0, rho_max: float = 0.9) -> nn.Module | None:
    """The attention module for ``attention`` in ``ATTENTION_MODES`` (``None`` for ``"none"``).

    ``sigma_min``, ``init_sigma`` and ``rho_max`` shape the foveal Gaussian; patch uses ``floor`` only.
    """
    if attention == "foveal":
        return FovealGaze(in_channels, height, width, floor=floor, sigma_min=sigma_min,
                          init_sigma=init_sigma, rho_max=rho_max)
    if attention == "patch":
        return PatchGaze(in_channels, height, width, floor=floor)
    if attention == "none":
        return None
    raise ValueError(f"attention={attention!r}: allowed values are {ATTENTION_MODES}")
