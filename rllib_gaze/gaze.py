"""Attention over a CNN feature map: the foveal Gaussian "gaze", the unconstrained patch arm and
the oracle, with the gaze's settings (``GAZE_DEFAULTS``, ``gaze_settings_errors``, ``build_gaze``).

Each attention module takes a feature map ``(B, C, H, W)`` and returns ``(attended, params)`` where
``attended`` has the input's shape and every channel of a cell is multiplied by the same weight.

Coordinates are normalised: cell centres lie in ``(-1, 1)`` on both axes, x along W, y along H,
so a sigma of 1.0 spans half the map whatever its resolution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Order of the 5 foveal parameters in every ``(B, 5)`` tensor this package passes around.
GAZE_PARAM_NAMES = ("mu_x", "mu_y", "sigma_x", "sigma_y", "sigma_xy")

# Pre-activation values are clamped here before squashing: tanh/softplus saturate long before,
# and the clamp keeps sigma bounded (so the map stays finite) whatever the feature map holds.
_RAW_LIMIT = 30.0


def cell_centres(height: int, width: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised coordinates of the cell centres: ``ys (H,)`` and ``xs (W,)`` in ``(-1, 1)``."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * (2.0 / height) - 1.0
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * (2.0 / width) - 1.0
    return ys, xs


ATTENTION_MODES = ("foveal", "patch", "oracle", "centre", "none")
# Attention modes whose map is one Gaussian, with ``(B, 5)`` parameters (the learnt gaze, and the fixed
# ones: the oracle on the true target, the centre on the image's centre).
GAUSSIAN_MODES = ("foveal", "oracle", "centre")


@dataclass(frozen=True)
class MapRegistration:
    """Where points of the image fall on an encoder's feature map, from its layers' receptive fields.

    Both sides use normalised coordinates in ``[-1, 1]`` (x along the width, y along the height;
    the image's from ``2 f - 1`` of a position ``f`` in ``[0, 1]``, the map's as ``cell_centres``).
    An unpadded conv stack does not tile the image evenly: NatureCNN's cell ``m`` sees a window
    centred at pixel ``18 + 8 m`` (continuous coordinates), so at 96 px its 8 x 8 map spans pixels
    18-74 and ``map = 1.5 * image + 0.0625`` on each axis. Padded stacks whose strides divide the
    image (GazeSAC's) give the identity. ``scale (2,)`` and ``offset (2,)`` are per axis, (x, y).
    """

    scale: tuple[float, float] = (1.0, 1.0)
    offset: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def of_layers(cls, layers: nn.Module, image_hw: tuple[int, int], map_hw: tuple[int, int]) -> MapRegistration:
        """The registration of the map ``map_hw`` that ``layers`` (convs and pools, in order; others
        are ignored) make from images ``image_hw``."""
        start, jump = [0.5, 0.5], [1.0, 1.0]  # (y, x): first cell's centre, in pixels, and the cells' spacing
        for layer in layers.modules():
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                kernel, stride, padding = (nn.modules.utils._pair(getattr(layer, a))
                                           for a in ("kernel_size", "stride", "padding"))
                for axis in (0, 1):
                    start[axis] += ((kernel[axis] - 1) / 2 - padding[axis]) * jump[axis]
                    jump[axis] *= stride[axis]
        scale, offset = [], []
        for axis in (1, 0):  # x then y
            size, cells = image_hw[axis], map_hw[axis]
            scale.append(size / (jump[axis] * cells))
            offset.append(scale[-1] - 2.0 * start[axis] / (jump[axis] * cells) + 1.0 / cells - 1.0)
        return cls(tuple(scale), tuple(offset))

    def image_to_map(self, points: torch.Tensor) -> torch.Tensor:
        """``points (..., 2)``, (x, y) in image coordinates ``[0, 1]`` -> map coordinates (``[-1, 1]`` on
        the map; beyond it for points outside every cell's window centre)."""
        scale, offset = points.new_tensor(self.scale), points.new_tensor(self.offset)
        return scale * (2.0 * points - 1.0) + offset

    def gaussian_to_image(self, params: torch.Tensor) -> torch.Tensor:
        """A map Gaussian ``params (..., 5)`` (``GAZE_PARAM_NAMES``) as the same Gaussian in the image's
        normalised coordinates: what a drawing on the image shows."""
        (sx_, sy_), (ox, oy) = self.scale, self.offset
        mu_x, mu_y, sx, sy, sxy = params.unbind(-1)
        return torch.stack([(mu_x - ox) / sx_, (mu_y - oy) / sy_, sx / sx_, sy / sy_, sxy / (sx_ * sy_)], -1)
NORMALIZATIONS = ("peak", "mean")
CENTRES = ("mlp", "soft_argmax")

# The module-side gaze settings, named as in ``GazePPOConfig.gaze()`` and the module's
# ``model_config``, with their defaults: the one place these defaults are set (docs/method.md
# says why each). ``GazePPOConfig`` starts from them and ``GazePPOModule`` fills what its
# model_config lacks from them.
GAZE_DEFAULTS: dict[str, Any] = {
    "attention": "foveal",         # ATTENTION_MODES
    "gaze_floor": 0.0,             # minimum weight of any cell, in [0, 1)
    "gaze_sigma_min": 0.05,        # foveal: smallest sigma (normalised units)
    "gaze_init_sigma": 1.0,        # foveal: starting spread, centred
    "gaze_rho_max": 0.9,           # foveal: |correlation| bound
    "gaze_normalization": "mean",  # NORMALIZATIONS: "mean" (mean weight 1) | "peak" (max weight 1)
    "gaze_head_init_std": 0.05,    # foveal: std of the head's output layer at init
    "gaze_centre": "mlp",          # CENTRES: "mlp" (tanh of the head) | "soft_argmax" (of a relevance map)
    "gaze_oracle_sigma": 0.3,      # oracle: fixed spread
    "gaze_fixed_sigma": 0.4,       # centre: fixed spread of the Gaussian on the image's centre
    # None: GazePPOConfig stops RL's gradient at the gaze exactly when another objective trains it
    # (and hands the module that bool); a module built alone lets RL train its gaze.
    "gaze_rl_gradient": None,
    "gaze_predict_coeff": 0.0,     # > 0: a return predictor on what the gaze sees (ours)
    # GAZE_INPUTS: what the gaze head reads: "map" (the paper) or "centred" (the map minus the
    # contrastive memory's mean map, kept by the learner: a candidate fix for GazeSAC, whose map
    # barely varies between observations, docs/results.md)
    "gaze_input": "map",
}
GAZE_INPUTS = ("map", "centred")


def gaze_settings_errors(settings: Mapping[str, Any]) -> list[str]:
    """Every problem with the module-side gaze ``settings`` (all of ``GAZE_DEFAULTS``' keys), each
    message naming the value and what is allowed. ``GazePPOConfig.validate`` and ``build_gaze``
    both check with this."""
    s = settings
    errors = []
    if s["attention"] not in ATTENTION_MODES:
        errors.append(f"attention={s['attention']!r} is not known; allowed values are {ATTENTION_MODES}")
    if not 0.0 <= s["gaze_floor"] < 1.0:
        errors.append(f"gaze_floor={s['gaze_floor']!r} must be in [0, 1)")
    if not 0.0 < s["gaze_sigma_min"] < s["gaze_init_sigma"]:
        errors.append(f"gaze_sigma_min={s['gaze_sigma_min']!r}, gaze_init_sigma={s['gaze_init_sigma']!r}: "
                      "need 0 < gaze_sigma_min < gaze_init_sigma")
    if not 0.0 <= s["gaze_rho_max"] < 1.0:
        errors.append(f"gaze_rho_max={s['gaze_rho_max']!r} must be in [0, 1)")
    if s["gaze_normalization"] not in NORMALIZATIONS:
        errors.append(f"gaze_normalization={s['gaze_normalization']!r} is not known; "
                      f"allowed values are {NORMALIZATIONS}")
    if not s["gaze_head_init_std"] > 0:
        errors.append(f"gaze_head_init_std={s['gaze_head_init_std']!r} must be > 0")
    if s["gaze_centre"] not in CENTRES:
        errors.append(f"gaze_centre={s['gaze_centre']!r} is not known; allowed values are {CENTRES}")
    for key in ("gaze_oracle_sigma", "gaze_fixed_sigma"):
        if not s[key] > 0:
            errors.append(f"{key}={s[key]!r} must be > 0")
    if s["gaze_rl_gradient"] is not None and not isinstance(s["gaze_rl_gradient"], bool):
        errors.append(f"gaze_rl_gradient={s['gaze_rl_gradient']!r} must be True, False or None (automatic)")
    if s["gaze_input"] not in GAZE_INPUTS:
        errors.append(f"gaze_input={s['gaze_input']!r} is not known; allowed values are {GAZE_INPUTS}")
    if not s["gaze_predict_coeff"] >= 0:
        errors.append(f"gaze_predict_coeff={s['gaze_predict_coeff']!r} must be >= 0 (0 = off)")
    elif s["gaze_predict_coeff"] > 0 and s["attention"] not in ("foveal", "patch"):
        errors.append(f"gaze_predict_coeff={s['gaze_predict_coeff']!r} needs a trainable attention; "
                      f"attention={s['attention']!r} has none")
    return errors


def gaussian_map(params: torch.Tensor, height: int, width: int, *, floor: float,
                 normalization: str) -> torch.Tensor:
    """Draw the gaze map of each observation from its Gaussian parameters.

    Args:
        params: ``(B, 5)`` = (mu_x, mu_y, sigma_x, sigma_y, sigma_xy) in normalised coordinates;
            the covariance ``[[sx^2, sxy], [sxy, sy^2]]`` must be positive definite.
        height, width: grid size of the map.
        floor: every weight is ``floor + (1 - floor) * g`` so no cell is ever zeroed.
        normalization: in ``NORMALIZATIONS``. ``"peak"``: the Gaussian ``g`` is 1 at its centre, so
            widening it raises every cell's weight (widening is free); ``"mean"``: the weights are
            divided by their mean over the map, so the total weight is fixed and widening dims the
            centre.

    Returns:
        ``(B, H, W)`` weights.
    """
    mu_x, mu_y, sx, sy, sxy = params.unbind(-1)
    ys, xs = cell_centres(height, width, device=params.device, dtype=params.dtype)
    dx = xs.view(1, 1, width) - mu_x.view(-1, 1, 1)
    dy = ys.view(1, height, 1) - mu_y.view(-1, 1, 1)
    sx, sy = sx.view(-1, 1, 1), sy.view(-1, 1, 1)
    rho = (sxy.view(-1, 1, 1) / (sx * sy)).clamp(-0.999, 0.999)
    zx, zy = dx / sx, dy / sy
    mahalanobis_sq = (zx * zx - 2.0 * rho * zx * zy + zy * zy) / (1.0 - rho * rho)
    weights = floor + (1.0 - floor) * torch.exp(-0.5 * mahalanobis_sq)
    if normalization == "mean":
        weights = weights / weights.mean(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return weights


def glimpse(maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """What a gaze sees: the weighted mean over cells of ``maps (B, C, H, W)`` under ``weights
    (B, H, W)``, a ``(B, C)`` channel vector per map."""
    return (maps * weights.unsqueeze(1)).flatten(2).sum(2) / weights.flatten(1).sum(1, keepdim=True).clamp_min(1e-12)


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

    Parameterisation (docs/method.md): centre ``tanh`` in ``(-1, 1)`` (``centre="mlp"``) or the
    soft-argmax of a learnt per-cell relevance map (``centre="soft_argmax"``: the expected cell
    position under ``softmax`` of a 1x1 convolution of the map, so the centre lands where some
    feature fires); each sigma is ``softplus + sigma_min``; correlation ``rho = rho_max * tanh`` and
    ``sigma_xy = rho * sx * sy``, so the covariance is positive definite for any input. The head
    starts at a centred gaze of spread ``init_sigma`` (wide: nothing is hidden before learning starts).

    Input ``(B, C, H, W)``; output ``attended (B, C, H, W)`` and ``params (B, 5)``. Build it with
    ``build_gaze``, which checks the settings; the constructor takes them as they are.
    """

    def __init__(self, in_channels: int, height: int, width: int, *, floor: float, sigma_min: float,
                 init_sigma: float, rho_max: float, normalization: str, head_init_std: float, centre: str):
        super().__init__()
        self.height, self.width = height, width
        self.floor, self.sigma_min, self.rho_max = floor, sigma_min, rho_max
        self.normalization = normalization
        self.head = _MapHead(in_channels, height, width, out_dim=5)
        # Output weights of std head_init_std + a bias that decodes to (0, 0, init_sigma,
        # init_sigma, 0). Too small a std starves the head's body of gradient (it is the
        # output layer's weights that carry it back), so the centre cannot learn to follow the input.
        nn.init.normal_(self.head.out.weight, std=head_init_std)
        softplus_inv = math.log(math.expm1(init_sigma - sigma_min))
        with torch.no_grad():
            self.head.out.bias.copy_(torch.tensor([0.0, 0.0, softplus_inv, softplus_inv, 0.0]))
        self.relevance = None
        if centre == "soft_argmax":
            # Weights of the same small std: a near-uniform softmax, so the gaze starts centred.
            self.relevance = nn.Conv2d(in_channels, 1, 1)
            nn.init.normal_(self.relevance.weight, std=head_init_std)
            nn.init.zeros_(self.relevance.bias)

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
        if self.relevance is not None:
            logits = torch.nan_to_num(self.relevance(features)).clamp(-_RAW_LIMIT, _RAW_LIMIT).flatten(1)
            probs = torch.softmax(logits, dim=1).view(-1, self.height, self.width)
            ys, xs = cell_centres(self.height, self.width, device=features.device, dtype=probs.dtype)
            mu = torch.stack([(probs.sum(1) * xs).sum(1), (probs.sum(2) * ys).sum(1)], dim=-1)
            params = torch.cat([mu, params[:, 2:]], dim=-1)
        weights = gaussian_map(params, self.height, self.width, floor=self.floor, normalization=self.normalization)
        return weights, params

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, params = self.attention_map(features)
        return features * weights.unsqueeze(1), params


class PatchGaze(nn.Module):
    """Unconstrained attention: one free weight in ``(floor, 1)`` per cell, predicted per observation.

    The paper's comparison arm for the foveal constraint. Initialised near-uniform (weights ~0.88).
    Input ``(B, C, H, W)``; output ``attended (B, C, H, W)`` and ``params (B, H, W)`` (the weights).
    """

    def __init__(self, in_channels: int, height: int, width: int, *, floor: float):
        super().__init__()
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


class FixedGaze(nn.Module):
    """A round Gaussian of fixed spread on a point of the image; nothing in it is learnt.

    Two uses, neither a method: ``point=None`` is the oracle, the upper bound of what one fovea can
    give, centred on the true target it reads per observation (the env's privileged ``"target"``,
    ``(B, 2)`` in image coordinates ``[0, 1]``); a fixed ``point`` (x, y) is the ``centre`` control, a
    fovea that never moves (what narrowing alone gives). The point goes onto the map through
    ``registration`` (the encoder's receptive fields). Input ``(B, C, H, W)`` (and the target for
    the oracle); output ``attended`` and ``params (B, 5)``, as ``FovealGaze``.
    """

    def __init__(self, height: int, width: int, *, sigma: float, floor: float, normalization: str,
                 registration: MapRegistration, point: tuple[float, float] | None = None):
        super().__init__()
        self.height, self.width, self.sigma = height, width, sigma
        self.floor, self.normalization = floor, normalization
        self.registration, self.point = registration, point

    def attention_map(self, features: torch.Tensor,
                      target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` (and, for the oracle, ``target (B, 2)`` in ``[0, 1]``) -> weights ``(B, H, W)``,
        params ``(B, 5)``."""
        if self.point is not None:
            target = features.new_tensor(self.point).expand(features.shape[0], 2)
        elif target is None:
            raise ValueError("the oracle gaze needs the target's position (B, 2)")
        mu = self.registration.image_to_map(target.to(features.dtype))
        sigma = mu.new_full((mu.shape[0], 2), self.sigma)
        params = torch.cat([mu, sigma, mu.new_zeros(mu.shape[0], 1)], dim=-1)
        weights = gaussian_map(params, self.height, self.width, floor=self.floor, normalization=self.normalization)
        return weights, params

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        weights, params = self.attention_map(features, target)
        return features * weights.unsqueeze(1), params


def build_gaze(settings: Mapping[str, Any], in_channels: int, height: int, width: int,
               registration: MapRegistration | None = None) -> FovealGaze | PatchGaze | FixedGaze | None:
    """The attention module over feature maps ``(B, in_channels, height, width)`` that ``settings``
    ask for (``None`` for ``attention="none"``); ``registration`` places the fixed gazes' image
    points on the map (default: a map that tiles the image evenly).

    ``settings``: any of ``GAZE_DEFAULTS``' keys (the others take their defaults; other keys are
    ignored, so a whole model_config will do). Raises ``ValueError`` listing every bad value
    (``gaze_settings_errors``).
    """
    s = {**GAZE_DEFAULTS, **settings}
    errors = gaze_settings_errors(s)
    if errors:
        raise ValueError("; ".join(errors))
    if s["attention"] == "foveal":
        return FovealGaze(in_channels, height, width, floor=s["gaze_floor"], sigma_min=s["gaze_sigma_min"],
                          init_sigma=s["gaze_init_sigma"], rho_max=s["gaze_rho_max"],
                          normalization=s["gaze_normalization"], head_init_std=s["gaze_head_init_std"],
                          centre=s["gaze_centre"])
    registration = registration or MapRegistration()
    if s["attention"] == "oracle":
        return FixedGaze(height, width, sigma=s["gaze_oracle_sigma"], floor=s["gaze_floor"],
                         normalization=s["gaze_normalization"], registration=registration)
    if s["attention"] == "centre":
        return FixedGaze(height, width, sigma=s["gaze_fixed_sigma"], floor=s["gaze_floor"],
                         normalization=s["gaze_normalization"], registration=registration, point=(0.5, 0.5))
    if s["attention"] == "patch":
        return PatchGaze(in_channels, height, width, floor=s["gaze_floor"])
    return None
