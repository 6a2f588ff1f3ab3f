"""SuccessMetrics against the truth read from the sampled episodes, with episodes cut into chunks by
the sampling calls (so "success once" may lie in an earlier chunk than the episode's end)."""

from __future__ import annotations

import numpy as np
import pytest
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from test_env_runner import config

from rllib_gaze.env_runner import BatchedEnvRunner


@pytest.mark.parametrize("runner_cls", [SingleAgentEnvRunner, BatchedEnvRunner])
def test_success_once_and_at_end_count_every_chunk_of_an_episode(runner_cls):
    # 12-step episodes sampled 3 vector steps at a time; big steps make the exploring policy cross a
    # target and leave it again, so "once" and "at end" differ
    runner = runner_cls(config=config(runner_cls, explore=True, max_episode_steps=12, terminate_on_success=False))
    chunks: dict[str, list] = {}
    ended = []
    for _ in range(12):
        for episode in runner.sample(num_timesteps=12):
            chunks.setdefault(episode.id_, []).append(episode)
            if episode.is_done:
                ended.append(episode.id_)
    metrics = runner.get_metrics()
    runner.stop()
    flags = [[bool(info["success"]) for chunk in chunks[i] for info in chunk.get_infos()] for i in ended]
    once, at_end = np.mean([any(f) for f in flags]), np.mean([f[-1] for f in flags])
    assert len(ended) >= 8 and once > at_end  # the case the per-chunk reading is for
    assert float(metrics["success_once"].peek()) == pytest.approx(once)
    assert float(metrics["success_at_end"].peek()) == pytest.approx(at_end)
