"""python -m rllib_gaze.visualize on a checkpoint trained for one iteration on the clutter env."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import running, tiny_config
from PIL import Image

from rllib_gaze.visualize import main


@pytest.fixture(scope="module")
def checkpoints(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for attention, contrastive in (("foveal", True), ("none", False)):
        with running(tiny_config(attention, contrastive)) as algo:
            algo.train()
            paths[attention] = algo.save_to_path(str(root / attention))
    return paths


def test_writes_gifs_contact_sheet_and_success_per_episode(checkpoints, tmp_path, capsys):
    out = tmp_path / "vis"
    paths = main([checkpoints["foveal"], "--episodes", "2", "--out", str(out), "--scale", "2"])
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["contact_sheet.png", "episode_0.gif", "episode_1.gif",
                                                          "episodes.json"]
    summary = json.loads((out / "episodes.json").read_text())
    assert [e["length"] for e in summary["episodes"]] == [50, 50]  # clutter's time limit, no early stop
    assert summary["success_rate"] == np.mean([e["success"] for e in summary["episodes"]])
    gif = Image.open(out / "episode_0.gif")
    assert gif.n_frames == 50 and gif.size == (96, 96)  # 48 px frames enlarged twice
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (8 * 96 + 7 * 2, 2 * 96 + 2)  # 8 steps per row, one row per episode
    printed = capsys.readouterr().out
    assert "[visualize] step 50: 2/2 episodes finished" in printed and "episode 1: success=" in printed


@pytest.mark.parametrize("argv, named", [
    (["{ckpt}", "--episodes", "0"], "--episodes=0"),
    (["{ckpt}", "--env-config", "[1, 2]"], "must be a JSON object"),
    (["{missing}"], "is not an RLlib algorithm checkpoint"),
    (["{ppo}"], "attention='none'"),
    (["{ckpt}", "--env-config", '{{"image_size": 64}}'], "was trained on Box(0, 255, (48, 48, 3), uint8)"),
    (["{ckpt}", "--env-config", '{{"include_state": true}}'], "gives observations Dict("),
])
def test_bad_input_is_named_before_any_rollout(argv, named, checkpoints, tmp_path, capsys):
    argv = [a.format(ckpt=checkpoints["foveal"], ppo=checkpoints["none"], missing=str(tmp_path / "nope")) for a in argv]
    with pytest.raises(SystemExit):
        main(argv + ["--out", str(tmp_path / "vis")])
    assert named in capsys.readouterr().err
    assert not (tmp_path / "vis").exists()
