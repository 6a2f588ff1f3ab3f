"""What a trial records and how to read it back: the names of the metrics and the rows of Tune's
``result.json``. A leaf module (no RLlib import), shared by the learner that logs the metrics, the
suite that follows a run and the report that reads it.
"""

from __future__ import annotations

import json
import math
import os

STEPS = "num_env_steps_sampled_lifetime"
# ManiSkill's two success metrics (rllib_gaze.callbacks.SuccessMetrics): success at any step of an
# episode, and at its last step.
SUCCESS_ONCE, SUCCESS_AT_END = "success_once", "success_at_end"
# The sample-efficiency metric: ppo_rgb's evaluation success rate (deterministic policy).
METRIC_PATH = ("evaluation", "env_runners", SUCCESS_ONCE)
# Where a single-agent trial's learner metrics are in a result row.
LEARNER = ("learners", "default_policy")

# The learner's own metrics, under LEARNER (docs/method.md says what each means).
CONTRASTIVE_ACTIVE_TRIPLET_FRAC_KEY = "contrastive_active_triplet_frac"
CONTRASTIVE_COS_AN_KEY = "contrastive_cos_an"
CONTRASTIVE_COS_AP_KEY = "contrastive_cos_ap"
CONTRASTIVE_COS_GAP_KEY = "contrastive_cos_gap"
CONTRASTIVE_FIXATION_LOSS_KEY = "contrastive_fixation_loss"
CONTRASTIVE_LABEL_AGREEMENT_KEY = "contrastive_label_agreement"
CONTRASTIVE_LOSS_KEY = "contrastive_loss"
CONTRASTIVE_MEMORY_FILL_KEY = "contrastive_memory_fill"
CONTRASTIVE_RETURN_SPREAD_KEY = "contrastive_return_spread"
CONTRASTIVE_RETURN_THRESHOLD_KEY = "contrastive_return_threshold"
CONTRASTIVE_VALID_ANCHOR_FRAC_KEY = "contrastive_valid_anchor_frac"
GAZE_GRAD_NORM_CONTRASTIVE_KEY = "gaze_grad_norm_contrastive"
GAZE_GRAD_NORM_CRITIC_KEY = "gaze_grad_norm_critic"  # GazeSAC's RL loss on the gaze
GAZE_GRAD_NORM_PPO_KEY = "gaze_grad_norm_ppo"
GAZE_PREDICT_LOSS_KEY = "gaze_predict_loss"
GAZE_TARGET_DISTANCE_KEY = "gaze_target_distance"
GAZE_TARGET_DISTANCE_CENTRE_KEY = "gaze_target_distance_centre"
GAZE_WEIGHT_MEAN_KEY = "gaze_weight_mean"
GAZE_WEIGHT_STD_KEY = "gaze_weight_std"
# DrAC's regularisers (the drac arms; GazePPOLearner._drac_loss), before aug_coef.
DRAC_POLICY_LOSS_KEY = "drac_policy_loss"
DRAC_VALUE_LOSS_KEY = "drac_value_loss"
# Under ("learners", "__all_modules__"): gradient steps skipped for a NaN/inf gradient, over the run.
NONFINITE_GRADIENT_STEPS_KEY = "nonfinite_gradient_steps_lifetime"


def gaze_param_key(param: str, stat: str) -> str:
    """The learner metric of one gaze parameter's batch statistic, e.g. ``gaze_sigma_x_mean``."""
    return f"gaze_{param}_{stat}"


def trial_params(experiment_dir: str) -> list[tuple[str, dict]]:
    """``(directory name, params.json)`` of every Tune trial in ``experiment_dir``, by name. A trial whose
    params.json is still empty or half written (Tune is creating it while a live experiment is read,
    or its driver was killed then) has no results yet and is left out."""
    trials = []
    for name in sorted(os.listdir(experiment_dir)):
        params_file = os.path.join(experiment_dir, name, "params.json")
        if os.path.exists(params_file):
            with open(params_file) as f:
                try:
                    trials.append((name, json.load(f)))
                except json.JSONDecodeError:
                    continue
    return trials


def result_rows(result_file: str) -> list[dict]:
    """The rows of a trial's ``result.json`` (one JSON object per line; none if it does not exist)."""
    rows = []
    if os.path.exists(result_file):
        with open(result_file) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a killed run
                    continue
    return rows


def evaluation_success(row: dict, interval: int, metric: str = SUCCESS_ONCE) -> float | None:
    """The evaluation success rate (``metric``: ``SUCCESS_ONCE`` or ``SUCCESS_AT_END``) of one result
    row, or None if that iteration did not evaluate.

    RLlib repeats the previous evaluation's metrics in the iteration after it (then NaN), so an
    iteration counts only when it is a multiple of ``evaluation_interval``."""
    if row.get("training_iteration", 0) % max(1, interval):
        return None
    value = row
    for key in (*METRIC_PATH[:-1], metric):
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
