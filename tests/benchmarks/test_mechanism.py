"""benchmarks/mechanism.py: every source builds what it says, and the objective localises where the
bench says it does (a seeded learning test of the mechanism, thresholds from docs/results.md)."""

import numpy as np
import pytest
import torch
from helpers import load_benchmark

mechanism = load_benchmark("mechanism")


@pytest.mark.parametrize("family", mechanism.SYNTHETIC)
def test_every_synthetic_family_builds_maps_with_their_places_and_two_returns(family):
    maps = mechanism.Synthetic(family, seed=0).sample(512)
    grid, channels = mechanism.GRID, mechanism.CHANNELS
    assert maps.maps.shape == (512, channels, grid, grid) and maps.maps.min() >= 0
    places = 1 if family in ("fixed", "moving", "conjunction", "copies") else 2
    assert maps.places.shape == (512, places, 2) and maps.places.abs().max() < 1
    high = maps.returns > 0.5
    assert 0.3 < high.float().mean() < 0.7                       # both labels, about balanced
    cells = ((maps.places + 1) * grid / 2 - 0.5).round().long()    # (N, P, (x, y))
    target = maps.maps[torch.arange(512), :, cells[:, 0, 1], cells[:, 0, 0]]  # (N, C) at the target
    if family in ("fixed", "moving", "conjunction", "copies"):
        # the target's state channel says the return (channel 1: high, channel 0: low)
        assert torch.equal(target[:, 1] > 0.5, high) and torch.equal(target[:, 0] > 0.5, ~high)
    else:
        gap = (cells[:, 0] - cells[:, 1]).abs().amax(1)           # Chebyshev distance agent-target
        assert torch.equal(gap <= 1, high) and (gap > 0).all()
    if family == "fixed":
        assert (maps.places[:, 0] == maps.places[0, 0]).all()
    if family in ("copies", "relational-copies"):
        target_cells = {tuple(c) for c in cells[:, 0].tolist()}
        assert len(target_cells) <= 32                             # one per scene


def test_episode_labels_are_return_to_go_or_the_episodes_return():
    rewards = np.array([1.0, 0.0, 2.0, 5.0, 1.0], dtype=np.float32)
    episode = np.array([0, 0, 0, 1, 1])
    g = mechanism.GAMMA
    assert np.allclose(mechanism.episode_labels(rewards, episode, "step"),
                       [1 + g * g * 2, g * 2, 2, 5 + g, 1])
    assert np.allclose(mechanism.episode_labels(rewards, episode, "episode"), [3, 3, 3, 6, 6])
    # a tail past the horizon feeds the return-to-go but not the episode's return or its success
    tail = np.array([False, False, True, False, True])
    success = np.array([False, False, True, True, False])
    assert np.allclose(mechanism.episode_labels(rewards, episode, "step", tail), [1 + g * g * 2, g * 2, 2, 5 + g, 1])
    assert np.allclose(mechanism.episode_labels(rewards, episode, "episode", tail), [1, 1, 1, 5, 5])
    assert np.allclose(mechanism.episode_labels(rewards, episode, "success", tail, success), [0, 0, 0, 1, 1])


def test_diagnostic_recording_is_encoded_with_its_places_on_the_map():
    memory, anchors = mechanism.recorded("fovea", "episode", seed=0, episodes=4)
    assert memory.maps.shape[1:] == (64, 8, 8) == anchors.maps.shape[1:]     # 96 px -> NatureCNN 8 x 8
    assert len(memory.maps) == len(anchors.maps) == 2 * 50                   # even / odd episodes
    assert set(memory.groups.tolist()) == {0, 2} and set(anchors.groups.tolist()) == {1, 3}
    # places on the map through NatureCNN's receptive fields (96 px: map = 1.5 x image + 0.0625)
    rec = mechanism.record_diagnostic("fovea", episodes=4, seed=0)
    even = ~rec["tail"] & (rec["episode"] % 2 == 0)                         # the memory's rows
    image = 2 * torch.as_tensor(rec["places"][even]).float() - 1
    assert torch.allclose(memory.places, 1.5 * image + 0.0625, atol=1e-6)
    assert len(torch.unique(memory.returns)) == 2                            # one return per episode
    # own-episode mining: the same episodes on both sides, alternate steps
    memory, anchors = mechanism.recorded("fovea", "step", seed=0, episodes=4, mining="episode")
    assert set(memory.groups.tolist()) == set(anchors.groups.tolist()) == {0, 1, 2, 3}
    assert memory.steps[:3].tolist() == [0, 2, 4] and anchors.steps[:3].tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="gap=5"):
        mechanism.train("moving", "fixation", steps=1, gap=5)   # synthetic rows have no steps


# Measured (docs/results.md, seed 0): fixed/triplet 0.37 at 100 steps, fixed/fixation 0.04 at 50
# (logged every 50), moving/fixation 0.36 at 100 and 0.12 at 200; the paper's triplet loss does
# not localise the moving target at all (1.06 at 400), so it has no row here.
@pytest.mark.parametrize(("source", "objective", "steps"), [
    ("fixed", "triplet", 100),
    ("fixed", "fixation", 50),
    ("moving", "fixation", 150),
])
def test_the_objective_localises_a_marked_target_within_the_stated_steps(source, objective, steps):
    run = mechanism.train(source, objective, steps=steps, log_every=steps, seed=0)
    assert run.ratios[0] > 0.9                # starts at the centre
    assert run.ratios[-1] < 0.5, run.ratios   # then at least halves its distance to the target


def test_bad_source_or_objective_is_refused_naming_it():
    with pytest.raises(ValueError, match="source='nowhere'"):
        mechanism.train("nowhere", "triplet")
    with pytest.raises(ValueError, match="objective='stare'"):
        mechanism.train("fixed", "stare")
    with pytest.raises(ValueError, match="mining='episode'.*recorded sources only"):
        mechanism.train("fixed", "triplet", mining="episode")


def test_the_control_diagnostic_records_the_target_alone_as_its_place():
    rec = mechanism.record_diagnostic("signal", episodes=2, seed=0)
    assert rec["places"].shape == (2 * (mechanism.HORIZON + mechanism.TAIL), 1, 2)
    from rllib_gaze.suite import TASKS
    assert TASKS["signal"].env_config == {**TASKS["fovea"].env_config, "target_signal": True}


def test_recordings_run_past_the_horizon_so_return_to_go_is_not_cut_short():
    rec = mechanism.record_diagnostic("fovea-still", episodes=3, seed=0)
    per_episode = mechanism.HORIZON + mechanism.TAIL
    assert len(rec["rewards"]) == 3 * per_episode and rec["tail"].sum() == 3 * mechanism.TAIL
    labels = mechanism.episode_labels(rec["rewards"], rec["episode"], "step", rec["tail"])
    last = mechanism.HORIZON - 1                   # the horizon's last row counts what follows it
    assert labels[last] == pytest.approx(rec["rewards"][last] + mechanism.GAMMA * labels[last + 1])
    assert labels[last] > rec["rewards"][last] + 0.5 * mechanism.GAMMA * rec["rewards"][last + 1]


def test_updates_of_one_epoch_all_anchors_are_the_steps_of_old():
    """--epochs 1 --minibatches 1 with every row an anchor is the one-step-per-draw loop; and with one
    epoch both neighbour settings search every step."""
    plain = mechanism.train("moving", "fixation", steps=6, log_every=3, seed=0)
    structured = mechanism.train("moving", "fixation", steps=6, log_every=3, seed=0, epochs=1, minibatches=1,
                                 minibatch_rows=256, neighbours="per_update")
    assert plain.ratios == structured.ratios and plain.agreement == structured.agreement


def test_per_update_neighbours_search_the_first_epoch_only_and_reuse_its_triplets(monkeypatch):
    searched = []
    search = mechanism.mine_triplets
    monkeypatch.setattr(mechanism, "mine_triplets", lambda maps, *a, **kw: searched.append(len(maps)) or
                        search(maps, *a, **kw))
    for neighbours, searches in (("per_minibatch", 2 * 3 * 2), ("per_update", 2 * 2)):
        searched.clear()
        run = mechanism.train("moving", "fixation", steps=12, log_every=6, anchors=32, epochs=3, minibatches=2,
                              minibatch_rows=64, neighbours=neighbours)
        assert len(searched) == searches and set(searched) == {32}   # 2 updates of 3 epochs x 2 minibatches
        assert 0 < run.valid <= 1 and run.objective.endswith(f"3 x 2 x 64 rows, {neighbours}")
    with pytest.raises(ValueError, match=r"neighbours='sometimes': allowed values are \('per_minibatch', "):
        mechanism.train("moving", "fixation", steps=1, epochs=2, neighbours="sometimes")
    with pytest.raises(ValueError, match=r"minibatch_rows=16: must be >= anchors \(32\)"):
        mechanism.train("moving", "fixation", steps=1, anchors=32, minibatch_rows=16)
