"""GazePPOLearner on real RLlib pieces (env runner, learner connector, learner), no Ray needed."""

import copy

import pytest
import torch
from helpers import tiny_config
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.policy.sample_batch import SampleBatch

from rllib_gaze import ARMS
from rllib_gaze.contrastive import chunk_return_to_go, chunk_steps, discounted_return_to_go, mine_rows, search_keys
from rllib_gaze.results import (
    CONTRASTIVE_ACTIVE_TRIPLET_FRAC_KEY,
    CONTRASTIVE_COS_AN_KEY,
    CONTRASTIVE_COS_AP_KEY,
    CONTRASTIVE_COS_GAP_KEY,
    CONTRASTIVE_FIXATION_LOSS_KEY,
    CONTRASTIVE_LABEL_AGREEMENT_KEY,
    CONTRASTIVE_LOSS_KEY,
    CONTRASTIVE_MEMORY_FILL_KEY,
    CONTRASTIVE_RETURN_SPREAD_KEY,
    CONTRASTIVE_RETURN_THRESHOLD_KEY,
    CONTRASTIVE_VALID_ANCHOR_FRAC_KEY,
    GAZE_GRAD_NORM_CONTRASTIVE_KEY,
    GAZE_GRAD_NORM_PPO_KEY,
    GAZE_PREDICT_LOSS_KEY,
    GAZE_TARGET_DISTANCE_CENTRE_KEY,
    GAZE_TARGET_DISTANCE_KEY,
)

MID = "default_policy"


def train_batch(learner, episodes):
    """The post-connector train batch (GAE included) RLlib's learner would build from ``episodes``."""
    batch = learner._learner_connector(rl_module=learner.module, batch={}, episodes=copy.deepcopy(episodes),
                                       shared_data={}, metrics=learner.metrics)
    return batch[MID]


def layout(batch):
    """``(rows that count (N,), rows that close an episode chunk (N,))``, bool, of a train batch: with
    ``values_from_sampling`` (the default) every row counts and each chunk's terminated or truncated row
    closes it; in RLlib's layout (False) the appended loss-masked row after each chunk closes it."""
    if Columns.LOSS_MASK in batch:
        mask = batch[Columns.LOSS_MASK].bool()
        return mask, ~mask
    ends = batch[Columns.TERMINATEDS].bool() | batch[Columns.TRUNCATEDS].bool()
    return torch.ones_like(ends), ends


def one_update(config, num_epochs):
    """Runner, learner, the first iteration's train batch, after one update on that iteration."""
    runner = SingleAgentEnvRunner(config=config)
    learner = config.build_learner(env=runner.env.unwrapped)
    episodes = runner.sample(num_timesteps=128)
    first = train_batch(learner, episodes)
    learner.update(episodes=episodes, num_epochs=num_epochs, minibatch_size=64,
                   timesteps={"num_env_steps_sampled_lifetime": 128})
    return runner, learner, first


@pytest.fixture
def trained():
    """A learner after one 3-epoch update (its memory holds that iteration) and a fresh batch."""
    config = tiny_config(contrastive_coeff=0.7)
    runner, learner, first = one_update(config, num_epochs=3)
    return config, learner, first, train_batch(learner, runner.sample(num_timesteps=128))


def test_memory_takes_each_row_once_per_iteration_not_once_per_epoch(trained):
    _, learner, first, _ = trained
    memory = learner.contrastive_memory(MID)
    # every sampled row of the iteration's batch once (no appended row of a chunk enters), with its GAE
    # value target as the return
    targets = first[Columns.VALUE_TARGETS][layout(first)[0]]
    assert len(memory) == targets.numel() == 128
    assert sorted(memory.filled()[2].tolist()) == pytest.approx(sorted(targets.tolist()), abs=1e-5)


def test_update_reports_the_gaze_and_contrastive_metrics(trained):
    _, learner, _, batch = trained
    results = learner.update(batch=SampleBatch(batch), num_epochs=1, minibatch_size=64,
                             timesteps={"num_env_steps_sampled_lifetime": 256})
    logged = results[MID]
    for key in [CONTRASTIVE_LOSS_KEY, CONTRASTIVE_VALID_ANCHOR_FRAC_KEY, CONTRASTIVE_ACTIVE_TRIPLET_FRAC_KEY,
                CONTRASTIVE_MEMORY_FILL_KEY, CONTRASTIVE_RETURN_THRESHOLD_KEY, CONTRASTIVE_RETURN_SPREAD_KEY,
                "gaze_mu_x_mean", "gaze_mu_y_std", "gaze_sigma_x_mean", "gaze_sigma_xy_mean"]:
        assert key in logged, key
    assert 0.0 < logged[CONTRASTIVE_MEMORY_FILL_KEY].peek() <= 1.0


def param_grads(module):
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in module.named_parameters()}


def test_contrastive_gradient_reaches_only_the_gaze(trained):
    config, learner, _, batch = trained
    module = learner.module[MID]
    features = module.forward_train(batch)["pre_attention_features"].detach()
    mask = layout(batch)[0]
    module.zero_grad()
    loss = learner._contrastive_loss(MID, config, features[mask], batch[Columns.VALUE_TARGETS][mask])
    assert loss.item() > 0
    loss.backward()
    grads = param_grads(module)
    moved = {name for name, g in grads.items() if g.abs().sum() > 0}
    assert moved and all(name.startswith("gaze.") for name in moved), moved
    assert any(name.startswith("gaze.head.out") for name in moved)


def test_ppo_loss_is_unchanged_and_trains_everything(trained):
    config, learner, _, batch = trained
    module = learner.module[MID]
    plain_config = config.copy(copy_frozen=False).gaze(contrastive=False)

    def loss_and_grads(cfg, seed):
        torch.manual_seed(seed)  # same anchor draw
        module.zero_grad()
        fwd = module.forward_train(batch)
        loss = learner.compute_loss_for_module(module_id=MID, config=cfg, batch=batch, fwd_out=fwd)
        loss.backward()
        return loss.detach(), param_grads(module)

    full, full_grads = loss_and_grads(config, 0)
    contrastive = learner.metrics.peek((MID, CONTRASTIVE_LOSS_KEY))
    plain, plain_grads = loss_and_grads(plain_config, 0)
    assert float(full - plain) == pytest.approx(0.7 * float(contrastive), rel=1e-4, abs=1e-6)
    for name in full_grads:
        if not name.startswith("gaze."):
            assert torch.allclose(full_grads[name], plain_grads[name], atol=1e-7), name
    # by default RL's gradient stops at the gaze: the PPO loss reaches every other parameter
    assert all(g.abs().sum() > 0 for name, g in plain_grads.items() if not name.startswith("gaze.")), \
        [n for n, g in plain_grads.items() if g.abs().sum() == 0]
    assert all(g.abs().sum() == 0 for name, g in plain_grads.items() if name.startswith("gaze."))


def test_with_gaze_rl_gradient_the_ppo_loss_trains_the_gaze_too(trained):
    config, learner, _, batch = trained
    plain = config.copy(copy_frozen=False).gaze(contrastive=False, gaze_rl_gradient=True)
    module = learner.module[MID]
    module.model_config["gaze_rl_gradient"] = True
    module._gaze_rl_gradient = True  # as a module built from this config would have it
    module.zero_grad()
    learner.compute_loss_for_module(module_id=MID, config=plain, batch=batch,
                                    fwd_out=module.forward_train(batch)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.gaze_parameters())


def test_optimizer_uses_ppo_rgb_adam_eps(trained):
    _, learner, _, _ = trained
    optimizers = dict(learner.get_optimizers_for_module(MID))
    assert optimizers["default_optimizer"].defaults["eps"] == 1e-5   # the gaze's own Adam: gaze_adam_eps


def test_adam_eps_is_a_training_setting_also_for_plain_ppo():
    config = tiny_config(**ARMS["ppo"]).training(adam_eps=1e-4)
    learner = config.build_learner(env=SingleAgentEnvRunner(config=config).env.unwrapped)
    assert dict(learner.get_optimizers_for_module(MID))["default_optimizer"].defaults["eps"] == 1e-4


def test_memory_subsamples_an_iteration_larger_than_its_capacity():
    _, learner, batch = one_update(tiny_config(contrastive_memory_capacity=48, contrastive_num_anchors=16),
                                   num_epochs=2)
    memory = learner.contrastive_memory(MID)
    stored = memory.filled()[2].tolist()
    targets = batch[Columns.VALUE_TARGETS][layout(batch)[0]].tolist()
    assert 44 <= len(memory) <= 48   # about capacity / rows of each minibatch, rounded up
    # a uniform draw from the whole epoch, not just its first minibatch's rows
    first_minibatch = set(round(t, 5) for t in batch[Columns.VALUE_TARGETS][:64].tolist())
    assert any(round(r, 5) not in first_minibatch for r in stored)
    assert all(any(abs(r - t) < 1e-5 for t in targets) for r in stored)


@pytest.mark.gpu
def test_memory_and_mining_live_on_the_learners_gpu():
    config = tiny_config().learners(num_gpus_per_learner=1)
    runner = SingleAgentEnvRunner(config=config)
    learner = config.build_learner(env=runner.env.unwrapped)
    for lifetime in (128, 256):
        results = learner.update(episodes=runner.sample(num_timesteps=128), num_epochs=1, minibatch_size=64,
                                 timesteps={"num_env_steps_sampled_lifetime": lifetime})
    memory = learner.contrastive_memory(MID)
    assert memory.maps.device.type == "cuda" and memory.keys.device.type == "cuda"
    assert results[MID][CONTRASTIVE_VALID_ANCHOR_FRAC_KEY].peek() > 0


@pytest.mark.parametrize("neighbours", ["per_minibatch", "per_update"])
def test_the_contrastive_path_reads_nothing_on_the_host_and_metrics_are_read_once_per_update(trained, neighbours):
    """No host sync in any gradient step's contrastive path (on a GPU each would stall the step);
    what must be read (which staged rows enter the memory, the metrics) is read once per update."""
    from rllib_gaze.profiling import OpCounter

    _, learner, _, batch = trained
    if neighbours == "per_update":   # the same learner and memory, the other setting
        learner.config = learner.config.copy(copy_frozen=False).gaze(mining_neighbours=neighbours)
    counter = OpCounter()
    pieces = {"contrastive": "_contrastive_term", "gaze metrics": "_log_gaze_stats",
              "after": "after_gradient_based_update", "batch": "_make_batch_if_necessary",
              "reuse": "_cached_neighbours"}
    for section, name in pieces.items():
        original = getattr(learner, name)
        setattr(learner, name, lambda *a, _o=original, _s=section, **kw: _run_in(counter, _s, _o, *a, **kw))
    try:
        with counter:
            logged = learner.update(batch=SampleBatch(batch), num_epochs=3, minibatch_size=64,
                                    timesteps={"num_env_steps_sampled_lifetime": 256})[MID]
    finally:
        for name in pieces.values():
            delattr(learner, name)
    assert counter.calls["contrastive"] >= 6 and counter.ops["contrastive"] > 0   # 3 epochs of >= 2 minibatches
    assert counter.sync_count("contrastive") == 0, counter.syncs.get("contrastive")
    assert counter.sync_count("reuse") == 0 and (counter.calls["reuse"] > 0) == (neighbours == "per_update")
    assert counter.sync_count("gaze metrics") == 0, counter.syncs.get("gaze metrics")
    # the staged rows' masks (one read; then nonzero and the chunks' bounds on host tensors, which a
    # CPU run cannot tell from device ones) and the metrics, together
    assert counter.sync_count("after") <= 3, counter.syncs.get("after")
    assert counter.sync_count("batch") <= 1, counter.syncs.get("batch")   # the rows the memory may take
    assert isinstance(logged[CONTRASTIVE_LOSS_KEY].peek(), float)
    assert isinstance(logged[GAZE_GRAD_NORM_CONTRASTIVE_KEY].peek(), float)
    assert logged[GAZE_GRAD_NORM_CONTRASTIVE_KEY].peek() > 0


def _run_in(counter, section, function, *args, **kwargs):
    with counter.section(section):
        return function(*args, **kwargs)


@pytest.mark.parametrize("case, why", [
    ("empty", CONTRASTIVE_MEMORY_FILL_KEY),          # nothing remembered yet
    ("all_equal", CONTRASTIVE_RETURN_SPREAD_KEY),    # no return difference: no positive/negative split
])
def test_degenerate_memory_gives_zero_loss_and_a_metric_that_says_why(trained, case, why):
    _, learner, _, batch = trained
    memory = learner.contrastive_memory(MID)
    if case == "empty":
        memory.size = memory._next = 0
    else:
        memory.returns.fill_(1.5)
    logged = learner.update(batch=SampleBatch(batch), num_epochs=1, minibatch_size=64,
                            timesteps={"num_env_steps_sampled_lifetime": 256})[MID]
    assert logged[CONTRASTIVE_LOSS_KEY].peek() == 0.0
    assert logged[CONTRASTIVE_VALID_ANCHOR_FRAC_KEY].peek() == 0.0
    assert logged[why].peek() == 0.0


def test_the_gaze_gets_its_own_adam_when_gaze_lr_is_set():
    config = tiny_config(gaze_lr=1e-3, gaze_adam_eps=1e-8)
    runner = SingleAgentEnvRunner(config=config)
    learner = config.build_learner(env=runner.env.unwrapped)
    optimizers = dict(learner.get_optimizers_for_module(MID))
    gaze_ids = {id(p) for p in learner.module[MID].gaze_parameters()}
    gaze_opt, main_opt = optimizers["gaze"], optimizers["default_optimizer"]
    assert {id(p) for g in gaze_opt.param_groups for p in g["params"]} == gaze_ids
    assert not gaze_ids & {id(p) for g in main_opt.param_groups for p in g["params"]}
    assert (gaze_opt.defaults["eps"], gaze_opt.param_groups[0]["lr"]) == (1e-8, 1e-3)
    assert (main_opt.defaults["eps"], main_opt.param_groups[0]["lr"]) == (1e-5, 3e-4)
    before = [p.detach().clone() for p in learner.module[MID].gaze_parameters()]
    for lifetime in (128, 256):  # the first update fills the memory; the second mines it
        learner.update(episodes=runner.sample(num_timesteps=128), num_epochs=1, minibatch_size=64,
                       timesteps={"num_env_steps_sampled_lifetime": lifetime})
    assert any(not torch.equal(b, p) for b, p in zip(before, learner.module[MID].gaze_parameters()))


def test_update_reports_what_the_objective_does():
    config = (tiny_config(contrastive_similarity="glimpse", contrastive_triplet_gaze="anchor",
                          gaze_rl_gradient=False, gaze_head_init_std=0.05, mining_centred=True)
              .environment("clutter", env_config={"image_size": 48, "num_distractors": 3, "seed": 0,
                                                  "include_state": True, "expose_target": True}))
    runner = SingleAgentEnvRunner(config=config)
    learner = config.build_learner(env=runner.env.unwrapped)
    for lifetime in (128, 256):
        logged = learner.update(episodes=runner.sample(num_timesteps=128), num_epochs=1, minibatch_size=64,
                                timesteps={"num_env_steps_sampled_lifetime": lifetime})[MID]
    values = {key: logged[key].peek() for key in (
        CONTRASTIVE_COS_AP_KEY, CONTRASTIVE_COS_AN_KEY, CONTRASTIVE_COS_GAP_KEY, CONTRASTIVE_LABEL_AGREEMENT_KEY,
        GAZE_GRAD_NORM_PPO_KEY, GAZE_GRAD_NORM_CONTRASTIVE_KEY, GAZE_TARGET_DISTANCE_KEY,
        GAZE_TARGET_DISTANCE_CENTRE_KEY)}
    gap = values[CONTRASTIVE_COS_AP_KEY] - values[CONTRASTIVE_COS_AN_KEY]
    assert values[CONTRASTIVE_COS_GAP_KEY] == pytest.approx(gap, abs=1e-5)
    assert 0.0 <= values[CONTRASTIVE_LABEL_AGREEMENT_KEY] <= 1.0
    assert values[GAZE_GRAD_NORM_PPO_KEY] == 0.0            # RL's gradient stops at the gaze
    maps = learner.contrastive_memory(MID).filled()[0]
    mean = maps.mean(0)
    assert torch.allclose(learner._mean_maps[MID], mean)  # centred search keys from the memory's mean
    assert torch.allclose(learner._centred_keys[MID], search_keys(maps - mean, 2))
    assert values[GAZE_GRAD_NORM_CONTRASTIVE_KEY] > 0.0
    assert 0.0 < values[GAZE_TARGET_DISTANCE_KEY] < 2 * 2 ** 0.5 and values[GAZE_TARGET_DISTANCE_CENTRE_KEY] > 0.0


def test_one_gaze_per_triplet_applies_the_anchors_weights_to_all_three(trained):
    config, learner, _, batch = trained
    module = learner.module[MID]
    features = module.forward_train(batch)["pre_attention_features"].detach()
    mask = layout(batch)[0]
    seen = []
    original = module.gaze_weights

    def spy(maps, obs=None):
        seen.append(maps.shape[0])
        return original(maps, obs)

    module.gaze_weights = spy
    try:
        for mode in ("anchor", "each"):
            seen.clear()
            torch.manual_seed(0)
            learner._contrastive_loss(MID, config.copy(copy_frozen=False).gaze(contrastive_triplet_gaze=mode),
                                      features[mask][:32], batch[Columns.VALUE_TARGETS][mask][:32])
            n = int(learner.metrics.peek((MID, CONTRASTIVE_VALID_ANCHOR_FRAC_KEY)) * 32)
            assert seen == ([n] if mode == "anchor" else [3 * n]), (mode, seen, n)
    finally:
        del module.gaze_weights


def test_gaze_predict_objective_trains_only_the_gaze_and_its_predictor():
    config = (tiny_config(**ARMS["gaze-predict"])
              .environment("clutter", env_config={"image_size": 48, "num_distractors": 3, "seed": 0,
                                                  "include_state": True}))
    runner = SingleAgentEnvRunner(config=config)
    learner = config.build_learner(env=runner.env.unwrapped)
    batch = train_batch(learner, runner.sample(num_timesteps=128))
    module = learner.module[MID]
    module.zero_grad()
    loss = learner._predict_loss(MID, batch, module.forward_train(batch))
    assert loss.item() > 0
    loss.backward()
    moved = {name for name, g in param_grads(module).items() if g.abs().sum() > 0}
    assert moved and all(name.startswith(("gaze.", "gaze_predictor.")) for name in moved), moved
    assert any(name.startswith("gaze.relevance") for name in moved)  # the soft-argmax centre learns
    logged = learner.update(batch=SampleBatch(batch), num_epochs=1, minibatch_size=64,
                            timesteps={"num_env_steps_sampled_lifetime": 128})[MID]
    assert logged[GAZE_PREDICT_LOSS_KEY].peek() > 0


@pytest.mark.parametrize("values_from_sampling", [True, False])
def test_return_to_go_labels_reach_the_memory(values_from_sampling):
    config = tiny_config(contrastive_return="return_to_go", contrastive_gamma=0.9).training(
        values_from_sampling=values_from_sampling)
    runner, learner, first = one_update(config, num_epochs=1)
    mask, ends = layout(first)
    stored = learner.contrastive_memory(MID).filled()[2]
    assert stored.numel() == int(mask.sum()) == 128
    # without the bootstrap term: at a chunk's first row (16 steps from its end) the bootstrap
    # counts 0.9^16 x V, a few hundredths for this barely trained critic
    zeros = torch.zeros(mask.shape[0])
    no_bootstrap = (chunk_return_to_go(first[Columns.REWARDS], ends, zeros, 0.9) if values_from_sampling else
                    discounted_return_to_go(first[Columns.REWARDS], first[Columns.TERMINATEDS], mask, zeros, 0.9))
    chunk_starts = torch.cat([torch.tensor([0]), ends.nonzero().squeeze(1)[:-1] + 1])
    for value in no_bootstrap[chunk_starts]:
        assert (stored - value).abs().min() < 0.05, (float(value), stored.tolist())
    assert not torch.allclose(stored.sort().values, first[Columns.VALUE_TARGETS][mask].sort().values)


@pytest.mark.parametrize("objective", ["fixation", "fixation+triplet"])
def test_fixation_objective_trains_only_the_gaze_and_logs_its_loss(objective):
    config = tiny_config(contrastive_objective=objective, fixation_pools=(1, 3))
    runner, learner, _ = one_update(config, num_epochs=1)
    batch = train_batch(learner, runner.sample(num_timesteps=128))
    module = learner.module[MID]
    mask = layout(batch)[0]
    features = module.forward_train(batch)["pre_attention_features"].detach()
    module.zero_grad()
    head_inputs, gaze_weights = [], module.gaze_weights
    module.gaze_weights = lambda maps, obs=None: head_inputs.append(len(maps)) or gaze_weights(maps, obs)
    anchors = features[mask]
    loss = learner._contrastive_loss(MID, config, anchors, batch[Columns.VALUE_TARGETS][mask])
    assert loss.item() > 0
    assert learner.metrics.peek((MID, CONTRASTIVE_FIXATION_LOSS_KEY)) > 0
    assert head_inputs == [len(anchors)]   # the anchors' gaze once, whichever objectives read it
    loss.backward()
    moved = {name for name, g in param_grads(module).items() if g.abs().sum() > 0}
    assert moved and all(name.startswith("gaze.") for name in moved), moved
    try:
        learner.metrics.peek((MID, CONTRASTIVE_COS_GAP_KEY))
        triplet_logged = True
    except KeyError:
        triplet_logged = False
    assert triplet_logged == (objective == "fixation+triplet")


@pytest.mark.parametrize("values_from_sampling", [True, False])
def test_episode_mining_mines_each_anchor_in_its_own_chunk_of_this_update(values_from_sampling):
    config = tiny_config(contrastive_objective="fixation", mining="episode", mining_gap=2).training(
        values_from_sampling=values_from_sampling)
    runner, learner, _ = one_update(config, num_epochs=1)     # the memory now holds a threshold
    episodes = runner.sample(num_timesteps=128)
    batch = train_batch(learner, episodes)
    mask, ends = layout(batch)
    chunk, step = chunk_steps(ends)
    assert chunk.max() + 1 == len(episodes)
    # the update stages every row with its chunk, step and key; its own-chunk mining finds triplets
    results = learner.update(episodes=episodes, num_epochs=2, minibatch_size=64,
                             timesteps={"num_env_steps_sampled_lifetime": 256})
    assert results[MID][CONTRASTIVE_VALID_ANCHOR_FRAC_KEY] > 0 and results[MID][CONTRASTIVE_FIXATION_LOSS_KEY] > 0
    # the bank a minibatch mines in: the staged rows, loss-masked rows in no chunk
    features = learner.module[MID].forward_train(batch)["pre_attention_features"].detach()
    returns = batch[Columns.VALUE_TARGETS]
    learner._staged, learner._rows_left_to_stage, learner._stage_fraction = {MID: []}, {MID: len(mask)}, {}
    learner._stage(MID, features, returns, mask, (chunk, step))
    bank, (bank_chunk, bank_step) = learner._staged_bank(MID, config.mining_pool)
    assert torch.equal(bank_chunk, torch.where(mask, chunk, -1)) and torch.equal(bank_step, step)
    rows = mine_rows(features[mask], returns[mask], bank, k=8, threshold=returns[mask].median(),
                     groups=(chunk[mask], bank_chunk), apart=(step[mask], bank_step, config.mining_gap))
    valid = rows.valid
    assert valid.sum() > 10
    for picked in (rows.positive[valid], rows.negative[valid]):
        assert torch.equal(bank_chunk[picked], chunk[mask][valid])
        assert ((bank_step[picked] - step[mask][valid]).abs() >= config.mining_gap).all()


def test_sac_refuses_episode_mining_naming_the_allowed_values():
    from helpers import tiny_sac_config

    with pytest.raises(ValueError, match=r"mining='episode' is not allowed with this algorithm; allowed values are "
                                         r"\('memory',\)"):
        tiny_sac_config(mining="episode").validate()



@pytest.mark.parametrize("mining", ["memory", "episode"])
def test_per_update_neighbours_are_searched_in_the_first_epoch_and_reused_in_the_later_ones(mining, monkeypatch):
    import rllib_gaze.contrastive_learner as contrastive_learner

    config = tiny_config(mining_neighbours="per_update", mining=mining)
    runner, learner, _ = one_update(config, num_epochs=1)            # the memory now holds a threshold
    searches, reuses = [], []
    search = contrastive_learner.mine_rows
    monkeypatch.setattr(contrastive_learner, "mine_rows", lambda *a, **kw: searches.append(1) or search(*a, **kw))
    reuse = learner._cached_neighbours

    def cached(module_id, rows, searched):
        # a later epoch's anchors are rows searched earlier in this update, with what was found then
        assert learner._neighbours[module_id]["cached"][rows[searched]].all()
        reuses.append(int(searched.sum()))
        return reuse(module_id, rows, searched)

    monkeypatch.setattr(learner, "_cached_neighbours", cached)
    for update in range(2):
        searches.clear(), reuses.clear()
        logged = learner.update(episodes=runner.sample(num_timesteps=128), num_epochs=3, minibatch_size=64,
                                timesteps={"num_env_steps_sampled_lifetime": 256 + 128 * update})[MID]
        # 128 rows in minibatches of 64: the first epoch's 2 minibatches search, the other 4 reuse
        assert (len(searches), len(reuses)) == (2, 4)
        assert sum(reuses) > 0 and logged[CONTRASTIVE_VALID_ANCHOR_FRAC_KEY].peek() > 0
        assert learner._neighbours == {}   # the cache is the update's: dropped after it, built anew by the next
    memory = learner.contrastive_memory(MID)   # own-episode mining hands the memory the keys it staged
    assert torch.allclose(memory.filled()[1], search_keys(memory.filled()[0], config.mining_pool), atol=1e-6)

def test_per_update_neighbours_equal_the_first_epochs_search():
    """Reused neighbours are the ones a search of the same rows gave in the first epoch."""
    config = tiny_config(mining_neighbours="per_update")
    runner, learner, _ = one_update(config, num_epochs=1)
    found = {}
    original_cache = learner._cache_neighbours

    def remember(module_id, rows, mined):
        original_cache(module_id, rows, mined)
        for row, s, p, n, v in zip(rows.tolist(), mined.searched.tolist(), mined.positive.tolist(),
                                   mined.negative.tolist(), mined.valid.tolist()):
            if s:
                found[row] = (p, n, v)

    reused = []
    original_cached = learner._cached_neighbours

    def check(module_id, rows, searched):
        mined = original_cached(module_id, rows, searched)
        for row, s, p, n, v in zip(rows.tolist(), searched.tolist(), mined.positive.tolist(),
                                   mined.negative.tolist(), mined.valid.tolist()):
            if s:
                reused.append(row)
                assert found[row] == (p, n, v)
        return mined

    learner._cache_neighbours, learner._cached_neighbours = remember, check
    try:
        learner.update(episodes=runner.sample(num_timesteps=128), num_epochs=2, minibatch_size=64,
                       timesteps={"num_env_steps_sampled_lifetime": 256})
    finally:
        del learner._cache_neighbours, learner._cached_neighbours
    assert len(reused) > 16 and len(set(reused)) == len(reused)   # each searched row at most once per later epoch


def test_with_one_epoch_both_neighbour_settings_give_the_same_losses():
    def losses(neighbours):
        config = tiny_config(mining_neighbours=neighbours)
        runner, learner, _ = one_update(config, num_epochs=1)
        torch.manual_seed(1)
        logged = learner.update(episodes=runner.sample(num_timesteps=128), num_epochs=1, minibatch_size=64,
                                timesteps={"num_env_steps_sampled_lifetime": 256})[MID]
        weights = torch.cat([p.detach().flatten() for p in learner.module[MID].parameters()])
        return ([logged[key].peek() for key in (CONTRASTIVE_LOSS_KEY, CONTRASTIVE_VALID_ANCHOR_FRAC_KEY,
                                                  CONTRASTIVE_LABEL_AGREEMENT_KEY, "total_loss")], weights)

    (per_minibatch, w_minibatch), (per_update, w_update) = losses("per_minibatch"), losses("per_update")
    assert per_minibatch[0] > 0 and per_minibatch == per_update
    assert torch.equal(w_minibatch, w_update)
