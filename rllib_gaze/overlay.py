"""Draw the gaze on observations: heatmap + one-sigma ellipse (foveal) or weight map (patch).

The gaze lives on the feature map, whose normalised coordinates ``[-1, 1]`` span the image (the
convention of ``rllib_gaze.gaze.cell_centres``), so a Gaussian drawn at image resolution with the
same parameters shows where the gaze looks. ``rllib_gaze.callbacks.GazeImages`` logs such drawings
to TensorBoard during training.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from rllib_gaze.gaze import gaussian_map

if TYPE_CHECKING:
    from rllib_gaze.module import GazeAPI

# An observation batch as the envs give it: images (B, H, W, 3) or a dict with "rgb" (B, H, W, 3)
# (and "state", "target").
NumpyObservations = np.ndarray | dict[str, np.ndarray]

ELLIPSE_COLOUR = np.array([255, 255, 0], dtype=np.uint8)  # yellow, rare in the scenes
_HEAT_COLOUR = np.array([255.0, 40.0, 0.0])


def module_gaze(module: GazeAPI, obs: NumpyObservations) -> tuple[np.ndarray, np.ndarray | None]:
    """The gaze of ``module`` (with attention) on a batch of observations.

    Args:
        obs: numpy image batch ``(B, H, W, 3)`` or dict with ``"rgb"`` (and ``"state"``, ``"target"``).

    Returns:
        weights ``(B, h, w)`` on the feature map, and the Gaussian's parameters ``(B, 5)`` =
        (mu_x, mu_y, sigma_x, sigma_y, sigma_xy) in the image's normalised coordinates (moved off the
        map by ``module.map_registration``), or None for patch attention.
    """
    if module.attention_kind == "none":
        raise ValueError("this module has attention='none': there is no gaze to draw")
    device = next(module.parameters()).device
    tensors = ({k: torch.as_tensor(np.asarray(v), device=device) for k, v in obs.items()} if isinstance(obs, dict)
               else torch.as_tensor(np.asarray(obs), device=device))
    with torch.no_grad():
        weights, params = module.gaze_weights(module.feature_map(tensors), tensors)
    if module.attention_kind == "patch":
        return weights.cpu().numpy(), None
    return weights.cpu().numpy(), module.map_registration.gaussian_to_image(params).cpu().numpy()


def image_weights(weights: np.ndarray | None, params: np.ndarray | None, height: int, width: int,
                  floor: float) -> np.ndarray:
    """One observation's gaze at image resolution ``(height, width)`` in ``[floor, 1]``: the Gaussian
    of ``params (5,)`` redrawn per pixel with its peak at 1 (foveal, oracle: ``weights`` unused), or
    the cell weights ``(h, w)`` upsampled (patch: ``params`` None)."""
    if params is not None:
        params = torch.as_tensor(params, dtype=torch.float32)[None]
        return gaussian_map(params, height, width, floor=floor, normalization="peak")[0].numpy()
    t = torch.as_tensor(weights, dtype=torch.float32)[None, None]
    return F.interpolate(t, size=(height, width), mode="nearest")[0, 0].numpy()


def draw(image: np.ndarray, weights: np.ndarray, params: np.ndarray | None = None) -> np.ndarray:
    """``image (H, W, 3) uint8`` with the gaze drawn on it: outside the gaze dimmed and tinted in
    proportion to ``weights (H, W)``, and for foveal ``params (5,)`` the one-sigma ellipse in
    ``ELLIPSE_COLOUR``. Returns ``(H, W, 3) uint8``."""
    w = np.clip(weights, 0.0, 1.0)[..., None]
    out = image.astype(np.float32) * (0.35 + 0.65 * w) + _HEAT_COLOUR * 0.3 * w
    out = np.clip(out, 0, 255).astype(np.uint8)
    if params is not None:
        for y, x in ellipse_pixels(params, *image.shape[:2]):
            out[y, x] = ELLIPSE_COLOUR
    return out


def ellipse_pixels(params: np.ndarray, height: int, width: int) -> list[tuple[int, int]]:
    """Pixels ``(row, col)`` on the one-sigma ellipse of foveal ``params (5,)`` in an image of
    ``height x width`` (pixel ``i``'s centre sits at normalised ``(i + 0.5) * 2 / size - 1``)."""
    mu_x, mu_y, sx, sy, sxy = (float(v) for v in params)
    cov = np.array([[sx * sx, sxy], [sxy, sy * sy]])
    chol = np.linalg.cholesky(cov + 1e-9 * np.eye(2))
    n = max(64, int(4 * math.pi * max(sx * width, sy * height)))
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    pts = np.array([mu_x, mu_y])[:, None] + chol @ np.stack([np.cos(t), np.sin(t)])
    cols = np.round((pts[0] + 1.0) * width / 2 - 0.5).astype(int)
    rows = np.round((pts[1] + 1.0) * height / 2 - 0.5).astype(int)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    return sorted(set(zip(rows[inside].tolist(), cols[inside].tolist())))


def draw_batch(module: GazeAPI, obs: NumpyObservations, floor: float) -> list[np.ndarray]:
    """Every observation of the batch with the module's gaze drawn on it (``(H, W, 3) uint8`` each);
    ``floor``: the module's ``gaze_floor``, the smallest weight the drawing gives a pixel."""
    rgb = np.asarray(obs["rgb"] if isinstance(obs, dict) else obs)
    weights, params = module_gaze(module, obs)
    height, width = rgb.shape[1:3]
    return [draw(rgb[i], image_weights(weights[i], None if params is None else params[i], height, width, floor),
                 None if params is None else params[i]) for i in range(len(rgb))]


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """``image (H, W, 3)`` enlarged ``scale`` times by repeating pixels: ``(scale H, scale W, 3)``."""
    return np.kron(image, np.ones((scale, scale, 1), dtype=image.dtype)) if scale > 1 else image


def tile(images: list[np.ndarray], columns: int, scale: int = 1, gap: int = 2) -> np.ndarray:
    """Images ``(H, W, 3)`` side by side, ``columns`` per row, each enlarged ``scale`` times."""
    images = [enlarge(im, scale) for im in images]
    h, w = images[0].shape[:2]
    rows = math.ceil(len(images) / columns)
    sheet = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = im
    return sheet


def fixed_observations(env_name: str, env_config: dict, count: int, seed: int) -> NumpyObservations:
    """``count`` first observations of the registered env ``env_name``, reset with ``seed``: the same
    scenes every time, so drawings from different iterations compare."""
    from rllib_gaze.envs import make_env

    env = make_env(env_name, env_config, count)
    try:
        obs, _ = env.reset(seed=seed)
    finally:
        env.close()
    return obs
