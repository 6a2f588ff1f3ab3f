import math

import pytest
import torch

from rllib_gaze.gaze import GAZE_DEFAULTS, MapRegistration, build_gaze, cell_centres, gaussian_map, gaze_settings_errors


def params(mu_x, mu_y, sx, sy, sxy):
    return torch.tensor([[mu_x, mu_y, sx, sy, sxy]], dtype=torch.float64)


def peak_map(p, height, width, floor=0.0):
    """The Gaussian with its peak at 1 (``normalization="peak"``)."""
    return gaussian_map(p, height, width, floor=floor, normalization="peak")


def foveal(in_channels, height, width, **settings):
    return build_gaze({"attention": "foveal", **settings}, in_channels, height, width)


def value_at(m, ys, xs, x, y):
    return m[0, int(torch.argmin((ys - y).abs())), int(torch.argmin((xs - x).abs()))].item()


def test_cell_centres_span_minus_one_to_one():
    ys, xs = cell_centres(4, 8)
    assert torch.allclose(ys, torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert xs[0].item() == pytest.approx(-0.875) and xs[-1].item() == pytest.approx(0.875)


def test_peak_is_one_at_the_centre():
    ys, xs = cell_centres(8, 8, dtype=torch.float64)
    m = peak_map(params(xs[5].item(), ys[2].item(), 0.3, 0.5, 0.0), 8, 8)
    assert m.max().item() == pytest.approx(1.0)
    assert m[0, 2, 5].item() == pytest.approx(1.0)
    assert torch.all(m <= 1.0)


def test_value_at_one_sigma_is_exp_minus_half():
    ys, xs = cell_centres(8, 8, dtype=torch.float64)
    sx = (xs[6] - xs[3]).item()      # one sigma along x lands exactly on a cell centre
    sy = (ys[5] - ys[3]).item()
    m = peak_map(params(xs[3].item(), ys[3].item(), sx, sy, 0.0), 8, 8)
    assert m[0, 3, 6].item() == pytest.approx(math.exp(-0.5))
    assert m[0, 5, 3].item() == pytest.approx(math.exp(-0.5))
    # two sigmas along y
    assert m[0, 7, 3].item() == pytest.approx(math.exp(-2.0))


def test_correlation_rotates_the_ellipse():
    ys, xs = cell_centres(9, 9, dtype=torch.float64)
    s, rho = (xs[2] - xs[0]).item(), 0.6
    m = peak_map(params(xs[4].item(), ys[4].item(), s, s, rho * s * s), 9, 9)
    # At (+s, +s) the Mahalanobis distance squared is 2 / (1 + rho); at (+s, -s) it is 2 / (1 - rho).
    assert m[0, 6, 6].item() == pytest.approx(math.exp(-1.0 / (1 + rho)))
    assert m[0, 2, 6].item() == pytest.approx(math.exp(-1.0 / (1 - rho)))
    # along one axis only: exp(-0.5 / (1 - rho^2))
    assert m[0, 4, 6].item() == pytest.approx(math.exp(-0.5 / (1 - rho * rho)))
    # the map is symmetric under a 180-degree turn about the centre
    assert torch.allclose(m[0], torch.flip(m[0], dims=(0, 1)))


def test_floor_bounds_every_weight():
    m = peak_map(params(0.9, 0.9, 0.05, 0.05, 0.0), 12, 12, floor=0.2)
    assert m.min().item() == pytest.approx(0.2, abs=1e-6)
    assert m.max().item() <= 1.0


def test_foveal_starts_centred_and_wide():
    # a small output-layer std, so each observation starts within 0.05 of the bias's decoded gaze
    gaze = foveal(16, 6, 6, gaze_init_sigma=1.0, gaze_head_init_std=1e-3)
    _, p = gaze(torch.rand(4, 16, 6, 6))
    assert torch.allclose(p[:, :2], torch.zeros(4, 2), atol=0.05)
    assert torch.allclose(p[:, 2:4], torch.ones(4, 2), atol=0.05)
    assert torch.allclose(p[:, 4], torch.zeros(4), atol=0.05)


def test_foveal_weights_every_channel_of_a_cell_alike():
    gaze = foveal(5, 6, 7)
    x = torch.rand(3, 5, 6, 7) + 0.5
    attended, p = gaze(x)
    ratio = attended / x
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))
    expected = gaussian_map(p, 6, 7, floor=0.0, normalization=GAZE_DEFAULTS["gaze_normalization"])
    assert torch.allclose(ratio[:, 0], expected)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1.0, 1e3, 1e6, 1e12, 1e30])
def test_foveal_covariance_positive_definite_and_everything_finite(scale):
    torch.manual_seed(0)
    gaze = foveal(8, 5, 5, gaze_rho_max=0.95)
    with torch.no_grad():  # extreme head weights push the raw outputs to saturation
        gaze.head.out.weight.normal_(std=10.0)
    x = (torch.randn(16, 8, 5, 5) * scale).requires_grad_(True)
    attended, p = gaze(x)
    sx, sy, sxy = p[:, 2], p[:, 3], p[:, 4]
    assert torch.all(sx > 0) and torch.all(sy > 0)
    assert torch.all(sx * sx * sy * sy - sxy * sxy > 0)
    assert torch.isfinite(attended).all() and torch.isfinite(p).all()
    (attended.sum() + p.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(q.grad).all() for q in gaze.parameters())


def test_patch_weights_per_cell_in_range():
    gaze = build_gaze({"attention": "patch", "gaze_floor": 0.1}, 4, 3, 5)
    x = torch.rand(2, 4, 3, 5) + 0.1
    attended, w = gaze(x)
    assert w.shape == (2, 3, 5)
    assert torch.all(w > 0.1) and torch.all(w < 1.0)
    assert torch.allclose(attended, x * w.unsqueeze(1))


def test_build_gaze_rejects_unknown_mode():
    assert build_gaze({"attention": "none"}, 4, 3, 3) is None
    with pytest.raises(ValueError, match=r"attention='spotlight'.*'foveal', 'patch', 'oracle', 'centre', 'none'"):
        build_gaze({"attention": "spotlight"}, 4, 3, 3)


def test_the_defaults_pass_the_checks_and_build_refuses_naming_every_bad_value():
    assert gaze_settings_errors(GAZE_DEFAULTS) == []
    with pytest.raises(ValueError) as refused:
        build_gaze({"gaze_floor": 1.0, "gaze_normalization": "sum", "gaze_centre": "peak",
                    "gaze_sigma_min": 2.0}, 4, 3, 3)
    for text in ("gaze_floor=1.0 must be in [0, 1)", "gaze_normalization='sum' is not known",
                 "('peak', 'mean')", "gaze_centre='peak' is not known", "('mlp', 'soft_argmax')",
                 "gaze_sigma_min=2.0, gaze_init_sigma=1.0: need 0 < gaze_sigma_min < gaze_init_sigma"):
        assert text in str(refused.value), str(refused.value)


def test_mean_normalisation_fixes_the_total_weight_so_widening_is_not_free():
    narrow = gaussian_map(params(0.0, 0.0, 0.2, 0.2, 0.0), 8, 8, floor=0.0, normalization="mean")
    wide = gaussian_map(params(0.0, 0.0, 2.0, 2.0, 0.0), 8, 8, floor=0.0, normalization="mean")
    assert narrow.mean().item() == pytest.approx(1.0) and wide.mean().item() == pytest.approx(1.0)
    assert narrow.max() > 4 * wide.max()       # the narrow fovea concentrates the same total weight
    peak_wide = peak_map(params(0.0, 0.0, 2.0, 2.0, 0.0), 8, 8)
    peak_narrow = peak_map(params(0.0, 0.0, 0.2, 0.2, 0.0), 8, 8)
    assert torch.all(peak_wide >= peak_narrow)  # peak-1: widening raises every cell's weight


def test_head_init_std_sets_how_much_the_centre_follows_the_input_at_init():
    torch.manual_seed(0)
    x = torch.rand(16, 4, 6, 6)
    spread = {}
    for std in (1e-3, 0.05):
        torch.manual_seed(0)
        _, p = foveal(4, 6, 6, gaze_head_init_std=std)(x)
        spread[std] = p[:, 0].std().item()
    assert spread[0.05] > 20 * spread[1e-3]


def test_oracle_centres_its_fixed_gaussian_on_the_target():
    gaze = build_gaze({"attention": "oracle", "gaze_oracle_sigma": 0.25, "gaze_normalization": "peak"}, 4, 8, 8)
    target = torch.tensor([[0.8125, 0.0625], [0.5, 0.5]])  # image coordinates [0, 1]
    attended, p = gaze(torch.ones(2, 4, 8, 8), target)
    assert torch.allclose(p[:, :2], 2 * target - 1) and torch.all(p[:, 2:4] == 0.25) and torch.all(p[:, 4] == 0)
    # (0.8125, 0.0625) is the centre of cell (row 0, col 6): the peak lands there
    assert attended[0, 0].argmax().item() == 0 * 8 + 6 and attended[0, 0, 0, 6].item() == pytest.approx(1.0)
    assert not list(gaze.parameters())


def test_fixed_gazes_place_image_points_through_the_registration():
    registration = MapRegistration(scale=(1.5, 1.5), offset=(0.0625, 0.0625))   # NatureCNN at 96 px
    centre = build_gaze({"attention": "centre", "gaze_fixed_sigma": 0.4}, 4, 8, 8, registration=registration)
    _, p = centre(torch.rand(3, 4, 8, 8))
    assert torch.allclose(p, torch.tensor([0.0625, 0.0625, 0.4, 0.4, 0.0]).expand(3, 5))
    oracle = build_gaze({"attention": "oracle"}, 4, 8, 8, registration=registration)
    _, p = oracle(torch.ones(1, 4, 8, 8), torch.tensor([[0.62, 0.5]]))
    assert torch.allclose(p[0, :2], torch.tensor([1.5 * 0.24 + 0.0625, 0.0625]))
    # a map Gaussian drawn on the image: back through the same affine map
    back = registration.gaussian_to_image(torch.tensor([[0.4225, 0.0625, 0.3, 0.6, 0.09]]))
    assert torch.allclose(back, torch.tensor([[0.24, 0.0, 0.2, 0.4, 0.04]]), atol=1e-6)


def test_soft_argmax_centre_lands_where_the_relevance_map_fires():
    gaze = foveal(3, 6, 6, gaze_centre="soft_argmax", gaze_head_init_std=0.05)
    x = torch.zeros(2, 3, 6, 6)
    _, start = gaze(x)
    assert torch.allclose(start[:, :2], torch.zeros(2, 2), atol=1e-6)   # uniform relevance: centred
    with torch.no_grad():
        gaze.relevance.weight.zero_()
        gaze.relevance.weight[0, 1] = 50.0                                # channel 1 is "relevant"
    x[0, 1, 4, 1] = 1.0                                                   # row 4, col 1
    x[1, 1, 0, 5] = 1.0                                                   # row 0, col 5
    _, p = gaze(x)
    ys, xs = cell_centres(6, 6)
    assert torch.allclose(p[:, :2], torch.tensor([[xs[1], ys[4]], [xs[5], ys[0]]]), atol=1e-4)
