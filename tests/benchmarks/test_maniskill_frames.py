"""benchmarks/maniskill_frames.py: a short real PushCube-v1 recording on the CPU (software Vulkan)."""

import time

import numpy as np
import pytest
from helpers import load_benchmark

maniskill_frames = load_benchmark("maniskill_frames")

SIZE, EPISODES, STEPS = 64, 2, 20


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    cache = tmp_path_factory.mktemp("frames")
    first = maniskill_frames.record_maniskill("PushCube-v1", episodes=EPISODES, seed=3, image_size=SIZE,
                                              max_steps=STEPS, cache_dir=str(cache))
    return first, cache


def _is_cube_blue(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) bool: PushCube's cube is blue (RGB 12, 42, 160 before lighting); the
    table is orange-brown, the target red and white, the robot white and grey."""
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    return (b > r + 40) & (b > g + 40)


def test_shapes_and_dtypes(recording):
    rec, _ = recording
    n = len(rec.step)
    assert 0 < n <= EPISODES * STEPS
    assert rec.images.shape == (n, SIZE, SIZE, 3) and rec.images.dtype == np.uint8
    assert rec.places.shape == (n, 2, 2) and rec.places.dtype == np.float32
    assert rec.place_names == ("cube", "goal")
    assert rec.rewards.shape == (n,) and rec.rewards.dtype == np.float32
    for name in ("episode", "step"):
        assert getattr(rec, name).shape == (n,) and getattr(rec, name).dtype == np.int64
    for name in ("terminated", "success"):
        assert getattr(rec, name).shape == (n,) and getattr(rec, name).dtype == bool
    assert rec.images.std() > 10  # real rendered content, not a blank frame


def test_places_project_onto_the_cube_and_the_target(recording):
    rec, _ = recording
    assert np.isfinite(rec.places).all()
    # The camera sees the whole table here: both places lie inside every frame.
    assert ((rec.places >= 0) & (rec.places <= 1)).all()
    pixel = np.floor(rec.places * SIZE).astype(int)  # (N, P, 2) column, row
    rows = np.arange(len(pixel))
    blue = _is_cube_blue(rec.images)  # (N, H, W); nothing but the cube is blue in PushCube's scene
    # The robot's hand hides the cube in some frames (a miss leaves it between camera and cube), so the
    # checks hold where the cube is in view: there, the blue pixels sit around the projected cube centre
    # (measured: within 0.4 pixel when the cube is in full view, up to 2 when the hand covers part of it).
    in_view = blue.sum(axis=(1, 2)) >= 2
    assert in_view.mean() > 0.5
    for i in np.flatnonzero(in_view):
        ys, xs = np.nonzero(blue[i])
        centroid = np.array([xs.mean(), ys.mean()]) + 0.5  # pixel i spans [i, i + 1)
        assert np.linalg.norm(centroid - rec.places[i, 0] * SIZE) < 2.5, (i, centroid, rec.places[i, 0] * SIZE)
    assert blue[rows, pixel[:, 0, 1], pixel[:, 0, 0]][in_view].mean() > 0.9
    # Five pixels off the projected point is no longer the (2.5-pixel wide) cube: the check is sharp.
    assert not blue[rows, pixel[:, 0, 1], np.clip(pixel[:, 0, 0] + 5, 0, SIZE - 1)].any()
    # The target's centre is red, where the cube does not cover it (first frames: the cube is 0.2 m away).
    first = rec.step == 0
    goal = rec.images[rows[first], pixel[first, 1, 1], pixel[first, 1, 0]].astype(int)
    assert ((goal[:, 0] > goal[:, 1] + 60) & (goal[:, 0] > goal[:, 2] + 60)).all(), goal


def test_rewards_and_episode_bookkeeping(recording):
    rec, _ = recording
    assert np.isfinite(rec.rewards).all() and (rec.rewards >= 0).all() and (rec.rewards <= 1).all()
    assert rec.episode[0] == 0 and (np.diff(rec.episode) >= 0).all()
    assert set(rec.episode.tolist()) == set(range(EPISODES))
    for e in range(EPISODES):
        rows = rec.episode == e
        steps = rec.step[rows]
        assert (steps == np.arange(len(steps))).all() and len(steps) <= STEPS
        # Only an episode's last row can be terminal; one that ends early ended by terminating.
        assert not rec.terminated[rows][:-1].any()
        assert rec.terminated[rows][-1] or len(steps) == STEPS
        # ManiSkill's PushCube terminates exactly on success; a successful step earns the top reward 1.
        assert (rec.terminated[rows] == rec.success[rows]).all()
        assert (rec.rewards[rows][rec.success[rows]] == 1).all()
    assert (rec.episode_success() == np.array([rec.success[rec.episode == e].any() for e in range(EPISODES)])).all()


def test_the_cache_returns_the_same_recording_quickly(recording):
    rec, cache = recording
    assert len(list(cache.glob("*.npz"))) == 1
    start = time.perf_counter()
    again = maniskill_frames.record_maniskill("PushCube-v1", episodes=EPISODES, seed=3, image_size=SIZE,
                                              max_steps=STEPS, cache_dir=str(cache))
    assert time.perf_counter() - start < 1.0
    assert again.place_names == rec.place_names
    for name in ("images", "places", "rewards", "episode", "step", "terminated", "success"):
        assert getattr(again, name).dtype == getattr(rec, name).dtype
        np.testing.assert_array_equal(getattr(again, name), getattr(rec, name))


def test_unknown_task_raises():
    with pytest.raises(ValueError, match=r"StackCube-v1.*PullCube-v1.*PushCube-v1"):
        maniskill_frames.record_maniskill("StackCube-v1", episodes=1, max_steps=1)


def test_a_cluttered_full_episode_recording_runs_past_success(recording):
    rec, _ = recording
    full = maniskill_frames.record_maniskill("PushCube-v1-Clutter", episodes=1, seed=3, image_size=SIZE,
                                             max_steps=STEPS, noise=0.0, full_episodes=True)
    assert full.place_names == ("cube", "goal") and len(full.step) == STEPS   # no early end
    first_success = int(np.argmax(full.success))
    assert full.success.any() and first_success < STEPS - 2                  # the expert succeeds early...
    assert full.terminated[first_success] and len(full.step) > first_success + 1   # ...and the episode goes on
    # the clutter shows: the same first scene (cube and goal where the plain recording has them) looks different
    np.testing.assert_allclose(full.places[0], rec.places[0], atol=1e-4)
    assert (np.abs(full.images[0].astype(int) - rec.images[0].astype(int)).sum(-1) > 60).mean() > 0.005
