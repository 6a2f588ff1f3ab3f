"""Gaze drawings land where the parameters say (checked on the written PNG)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rllib_gaze.overlay import ELLIPSE_COLOUR, draw, draw_batch, image_weights, tile

SIZE = 64


def _round_trip(image: np.ndarray, path) -> np.ndarray:
    Image.fromarray(image).save(path)
    return np.asarray(Image.open(path).convert("RGB"))


def test_foveal_overlay_centre_and_one_sigma_ellipse_where_the_parameters_put_them(tmp_path):
    params = np.array([0.5, -0.5, 0.15, 0.1, 0.0])  # centre right of middle, in the upper half
    grey = np.full((SIZE, SIZE, 3), 128, np.uint8)
    png = _round_trip(draw(grey, image_weights(None, params, SIZE, SIZE, floor=0.0), params), tmp_path / "foveal.png")

    # pixel i's centre is at (i + 0.5) * 2 / 64 - 1: mu_x = 0.5 -> column 47.5, mu_y = -0.5 -> row 15.5
    not_ellipse = ~np.all(png == ELLIPSE_COLOUR, axis=-1)
    red = np.where(not_ellipse, png[..., 0].astype(int), -1)
    row, col = np.unravel_index(np.argmax(red), red.shape)
    assert row in (15, 16) and col in (47, 48)
    assert png[0, 0, 0] < png[row, col, 0]  # far from the gaze: dimmed

    rows, cols = np.nonzero(~not_ellipse)
    # one sigma: 0.15 * 32 = 4.8 px across, 0.1 * 32 = 3.2 px down, around (47.5, 15.5)
    assert cols.min() == pytest.approx(47.5 - 4.8, abs=1.0) and cols.max() == pytest.approx(47.5 + 4.8, abs=1.0)
    assert rows.min() == pytest.approx(15.5 - 3.2, abs=1.0) and rows.max() == pytest.approx(15.5 + 3.2, abs=1.0)


def test_patch_overlay_brightens_exactly_the_attended_cell(tmp_path):
    weights = np.zeros((4, 4), np.float32)
    weights[1, 3] = 1.0  # feature cell (row 1, col 3) -> image rows 16..31, cols 48..63
    grey = np.full((SIZE, SIZE, 3), 128, np.uint8)
    drawing = draw(grey, image_weights(weights, None, SIZE, SIZE, floor=0.0))
    png = _round_trip(drawing, tmp_path / "patch.png").astype(int)
    bright = png[..., 0] > 128
    assert bright[16:32, 48:64].all() and bright.sum() == 16 * 16


def test_draw_batch_uses_the_modules_own_gaze(tmp_path):
    from test_module import module as build_module

    module = build_module(attention="foveal")
    obs = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    images = draw_batch(module, obs, floor=0.0)
    assert len(images) == 3 and images[0].shape == (64, 64, 3) and images[0].dtype == np.uint8
    with torch.no_grad():
        _, params = module.gaze_weights(module.feature_map(torch.as_tensor(obs)))
    params = module.map_registration.gaussian_to_image(params)  # drawn where the map's cells see
    expected = draw(obs[0], image_weights(None, params[0].numpy(), 64, 64, floor=0.0), params[0].numpy())
    np.testing.assert_array_equal(images[0], expected)
    sheet = tile(images, columns=2, scale=2, gap=2)
    assert sheet.shape == (2 * 128 + 2, 2 * 128 + 2, 3)


def test_gaze_images_land_on_every_nth_iteration(ray_session):
    from helpers import running, tiny_config

    with running(tiny_config().gaze(gaze_image_interval=2, gaze_image_count=4)) as algo:
        results = [algo.train() for _ in range(3)]
    assert ["gaze_images" in r for r in results] == [False, True, False]
    image = results[1]["gaze_images"]
    # (3, H, W) uint8 for TensorBoard: 4 observations of 48 px, enlarged twice, tiled 2 x 2 with a 2 px gap
    assert image.shape == (3, 2 * 96 + 2, 2 * 96 + 2) and image.dtype == np.uint8
