"""GazePPO (foveal gaze + contrastive loss) learns the clutter task on CPU within ~25 s.

Thresholds come from measured runs of exactly this config and seed (docs/benchmarks.md,
"Learning test"): with the first defaults, first report 2.45 and mean of the last four reports
6.65; with issue 11's defaults (glimpse similarity, one gaze per triplet, the gaze trained only by
the contrastive loss), 2.50 and 5.20. A random policy scores about 2.8. The asserted levels
(first < 3.5, last four > 4.0) leave about 1 of margin and still need a clear improvement.
"""

import math

from helpers import running

from rllib_gaze import GazePPOConfig


def test_full_method_improves_on_the_clutter_task(ray_session):
    config = (
        GazePPOConfig()
        .environment("clutter", env_config={"image_size": 48, "num_distractors": 3, "seed": 0})
        .env_runners(num_env_runners=0, num_envs_per_env_runner=32, rollout_fragment_length=32,
                     gym_env_vectorize_mode="vector_entry_point")
        .training(train_batch_size_per_learner=1024, minibatch_size=128, num_epochs=8)
        .gaze(attention="foveal", contrastive=True, contrastive_num_anchors=128, contrastive_memory_capacity=4096)
        .debugging(seed=0)
    )
    returns = []
    with running(config) as algo:
        for _ in range(12):
            value = algo.train()["env_runners"].get("episode_return_mean")
            if value is not None and not math.isnan(value):   # iterations where no episode ended
                returns.append(value)
    print("clutter episode_return_mean per reporting iteration:", [round(float(r), 2) for r in returns])
    assert len(returns) >= 6, returns
    assert returns[0] < 3.5, returns
    assert sum(returns[-4:]) / 4 > 4.0, returns
