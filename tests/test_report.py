"""The report on a synthetic experiment whose answers are computed by hand (in the comments)."""

from __future__ import annotations

import json
import math

import pytest

from rllib_gaze.report import bootstrap_ratio, learner_series, load_curves, table, verdict, write_report
from rllib_gaze.results import (
    CONTRASTIVE_LABEL_AGREEMENT_KEY,
    GAZE_TARGET_DISTANCE_CENTRE_KEY,
    GAZE_TARGET_DISTANCE_KEY,
)

STEPS = [1000, 2000, 3000, 4000]
REPS = 50   # rliable's bootstrap resamples in these tests (the report's own default is 2000)
# (task, arm, seed) -> evaluation success at STEPS (fewer values: the trial stopped early)
CURVES = {
    ("clutter", "ppo", 0): [0.0, 0.4, 0.6, 0.9],
    ("clutter", "ppo", 1): [0.2, 0.4, 0.8, 0.9],      # mean 0.1 0.4 0.7 0.9: 50% at 3000, 80% at 4000
    ("clutter", "gaze", 0): [0.4, 0.8, 1.0, 1.0],
    ("clutter", "gaze", 1): [0.6, 0.8, 0.8, 1.0],     # mean 0.5 0.8 0.9 1.0: 50% at 1000, 80% at 2000
    ("clutter", "gaze-rl", 0): [0.0, 0.0, 0.0, 0.6],
    ("clutter", "gaze-rl", 1): [0.0, 0.0, 0.9],       # common steps end at 3000: mean 0 0 0.45, never 50%
    ("clutter", "patch", 0): [0.0, 0.1],              # partial, one seed
    ("PushCube-v1", "ppo", 0): [0.0, 0.1, 0.2],       # never reaches 50% within 3000 steps
    ("PushCube-v1", "gaze", 0): [0.0, 0.6, 0.9],      # 50% at 2000: ratio > 3000/2000; 80% at 3000: > 1
}


def _trial(root, name: str, params: dict, rows: list[dict], tail: str = "") -> None:
    trial = root / name
    trial.mkdir()
    (trial / "params.json").write_text(json.dumps(params))
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


@pytest.fixture
def experiment(tmp_path):
    for (task, arm, seed), values in CURVES.items():
        rows, previous = [], math.nan
        for i, (step, value) in enumerate(zip(STEPS, values)):
            # evaluation_interval=2, as RLlib reports it: the iteration after an evaluation repeats
            # its metrics (stale), the others have NaN
            rows.append({"training_iteration": 2 * i + 1, "num_env_steps_sampled_lifetime": step - 500,
                         "evaluation": {"env_runners": {"success_once": previous}}})
            rows.append({"training_iteration": 2 * i + 2, "num_env_steps_sampled_lifetime": step,
                         "evaluation": {"env_runners": {"success_once": value}}})
            previous = value
        _trial(tmp_path, f"{task}_{arm}_seed{seed}",
               {"task": task, "arm": arm, "seed": seed, "evaluation_interval": 2}, rows,
               tail='{"training_iteration": 99, "num_env_st')  # a line cut short by a killed driver
    _trial(tmp_path, "clutter_ppo_seed7", {"task": "clutter", "arm": "ppo", "seed": 7},
           [{"training_iteration": 1, "num_env_steps_sampled_lifetime": 500}])  # not evaluated yet
    (tmp_path / "clutter_gaze_seed8").mkdir()  # a trial Tune is creating: its params.json not written yet
    (tmp_path / "clutter_gaze_seed8" / "params.json").write_text("")
    return tmp_path


def _rows(markdown_table: str) -> dict[str, list[str]]:
    lines = markdown_table.strip().splitlines()
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_steps_to_level_ratios_final_and_auc_match_hand_computed_values(experiment):
    curves, notes = load_curves(str(experiment))
    clutter = [c for c in curves if c.task == "clutter"]
    assert [c.arm for c in clutter] == ["ppo", "gaze", "gaze-rl", "patch"]
    rows = _rows(table(clutter, (0.5, 0.8)))
    # columns: seeds, env steps, to 50%, to 80%, ratio 50%, ratio 80%, final, AUC, ratio CI 50%, ratio CI 80%
    assert rows["ppo"] == ["2", "4,000", "3,000", "4,000", "1.00", "1.00", "0.90 ± 0.00", "0.533",  # (0.25+0.55+0.8)/3
                           "-", "-"]
    # AUC 0.817 = (0.65 + 0.85 + 0.95) / 3
    assert rows["gaze"][:8] == ["2", "4,000", "1,000", "2,000", "3.00", "2.00", "1.00 ± 0.00", "0.817"]
    assert rows["gaze-rl"][:6] == ["2", "3,000", "never reached", "never reached", "-", "-"]
    assert rows["gaze-rl"][6] == "0.75 ± 0.21"   # last points 0.6 and 0.9
    assert rows["patch"][:6] == ["1", "2,000", "never reached", "never reached", "-", "-"]
    assert any("clutter_ppo_seed7" in note and "no evaluation" in note for note in notes)

    push = _rows(table([c for c in curves if c.task == "PushCube-v1"], (0.5, 0.8)))
    assert push["ppo"][2:6] == ["never reached", "never reached", "-", "-"]
    assert push["gaze"][2:6] == ["2,000", "3,000", "> 1.50", "> 1.00"]


def test_bootstrap_interval_of_the_ratio_matches_the_hand_computed_resamples(experiment):
    """Two seeds per arm: a resample is {0,0}, {1,1} (1/4 each) or {0,1} (1/2).
    50%: ppo reaches it at 3000 in every resample; gaze at 2000 for {0,0} (0.4, 0.8) and at 1000
    otherwise (0.6, or the mean 0.5): ratios 1.5 (1/4) and 3 (3/4), so the interval is [1.5, 3].
    80%: ppo at 4000 for {0,0} and {0,1}, 3000 for {1,1}; gaze at 2000 always: [1.5, 2].
    gaze-rl at 50%: {0,0} reaches it at 4000 (0.75), {1,1} at 3000 (1.0), {0,1}'s common points end at
    3000 with mean 0.45 (never: 0), so [0, 1], which holds 1. patch has one seed: no interval."""
    curves, _ = load_curves(str(experiment))
    rows = _rows(table([c for c in curves if c.task == "clutter"], (0.5, 0.8)))
    assert rows["gaze"][8:] == ["[1.50, 3.00] win", "[1.50, 2.00] win"]
    assert rows["gaze-rl"][8] == "[0.00, 1.00] -"
    assert rows["patch"][8:] == ["needs >= 2 seeds", "needs >= 2 seeds"]  # one seed: no interval
    ppo, gaze = (next(c for c in curves if (c.task, c.arm) == ("clutter", arm)) for arm in ("ppo", "gaze"))
    assert bootstrap_ratio(ppo, gaze, 0.5) == bootstrap_ratio(ppo, gaze, 0.5)  # a fixed draw: the same report
    assert verdict((0.9, 1.2)) == "-" and verdict((1.01, 2.0)) == "win" and verdict((0.2, 0.99)) == "loss"


def test_no_verdict_when_neither_arm_reaches_the_level(experiment):
    """80% on clutter: gaze-rl reaches it only in the {1,1} resample (0.9 at 3000); {0,0} and {0,1}
    never do. Censored for ppo, the high end is ppo's 4000 over gaze-rl's last step 3000 = 1.33;
    against it, 0: the interval [0, 1.33] holds 1 and calls nothing, though gaze-rl mostly failed.
    PushCube: ppo never reaches 50%, gaze always at 2000: [3000 / 2000, inf], a win."""
    curves, _ = load_curves(str(experiment))
    rows = _rows(table([c for c in curves if c.task == "clutter"], (0.8,)))
    assert rows["gaze-rl"][-1] == "[0.00, 1.33] -"
    push = [c for c in curves if c.task == "PushCube-v1"]
    ppo, gaze = push
    assert bootstrap_ratio(ppo, gaze, 0.5) == (1.5, math.inf)


def test_band_is_a_student_t_interval_clipped_to_zero_one(experiment):
    curves, _ = load_curves(str(experiment))
    ppo = next(c for c in curves if (c.task, c.arm) == ("clutter", "ppo"))
    steps, mean, low, high = ppo.mean()
    assert list(steps) == STEPS and mean == pytest.approx([0.1, 0.4, 0.7, 0.9])
    # step 3000: values 0.6, 0.8 -> sd 0.1414, t(0.975, 1) = 12.706: half width 12.706 * 0.1 = 1.27 -> clipped
    assert (low[2], high[2]) == (0.0, 1.0)
    assert low[1] == high[1] == pytest.approx(0.4)  # both seeds 0.4: no spread


def test_write_report_makes_markdown_and_one_png_per_task(experiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    markdown = write_report(str(experiment), str(out), reps=REPS)
    assert (out / "report.md").read_text() == markdown
    for task in ("clutter", "PushCube-v1"):
        png = out / f"success_{task}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"![{task}](success_{task}.png)" in markdown
    assert "never reached" in markdown and "> 1.50" in markdown
    # rliable's part: a table per task and over both tasks, their IQM curves and the profiles
    for image in ("iqm_clutter.png", "iqm_PushCube-v1.png", "iqm_all.png", "profiles.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({image})" in markdown
    assert "## All tasks" in markdown
    clutter = _rows(markdown.split("## clutter")[1].split("Final success by rliable")[1].split("\n\n")[1])
    assert clutter["patch"][-2:] == ["needs >= 2 seeds", "no call"]      # one seed: no interval, no call
    assert clutter["ppo"][0] == "2" and clutter["ppo"][-2:] == ["-", "-"]  # the baseline itself


def test_seeds_keeps_only_those_seeds(experiment):
    curves, _ = load_curves(str(experiment), seeds=(1,))
    ppo = next(c for c in curves if (c.task, c.arm) == ("clutter", "ppo"))
    assert list(ppo.runs) == [1] and ppo.steps_to(0.8) == 3000.0  # seed 1 alone: 0.2 0.4 0.8


def test_until_keeps_only_evaluations_up_to_that_many_steps(experiment):
    curves, _ = load_curves(str(experiment), until=2000)
    ppo = next(c for c in curves if (c.task, c.arm) == ("clutter", "ppo"))
    assert ppo.runs == {0: [(2, 1000, 0.0), (4, 2000, 0.4)], 1: [(2, 1000, 0.2), (4, 2000, 0.4)]}
    rows = _rows(table([c for c in curves if c.task == "clutter"], (0.5,)))
    assert rows["gaze"][2:4] == ["1,000", "> 2.00"]  # ppo's mean never reaches 50% by step 2000


def test_seeds_align_on_the_evaluation_iteration_when_their_step_counts_differ(tmp_path):
    # seed 1 sampled 24 steps fewer per evaluation (e.g. after an env runner fault)
    for seed, shift in ((0, 0), (1, -24)):
        rows = [{"training_iteration": i, "num_env_steps_sampled_lifetime": 1000 * i + shift * i,
                 "evaluation": {"env_runners": {"success_once": 0.3 * i}}} for i in (1, 2, 3)]
        params = {"task": "t", "arm": "gaze", "seed": seed, "evaluation_interval": 1}
        _trial(tmp_path, f"t_gaze_seed{seed}", params, rows)
    (curve,), _ = load_curves(str(tmp_path))
    steps, mean, _, _ = curve.mean(common_only=True)
    assert steps.tolist() == [988.0, 1976.0, 2964.0] and mean == pytest.approx([0.3, 0.6, 0.9])
    assert curve.steps_to(0.5) == 1976.0


def test_diagnosis_table_and_gaze_distance_plot_from_the_learner_metrics(tmp_path):
    for seed, last in ((0, 0.2), (1, 0.4)):
        rows = [{"training_iteration": i, "num_env_steps_sampled_lifetime": 1000 * i,
                 "evaluation": {"env_runners": {"success_once": 0.1 * i}},
                 "learners": {"default_policy": {GAZE_TARGET_DISTANCE_KEY: 0.8 if i < 6 else last,
                                                 GAZE_TARGET_DISTANCE_CENTRE_KEY: 0.8,
                                                 CONTRASTIVE_LABEL_AGREEMENT_KEY: 0.5 + 0.1 * seed,
                                                 "gaze_mu_x_mean": -0.1 * i}}}
                for i in range(1, 7)]
        _trial(tmp_path, f"fovea_gaze_seed{seed}", {"task": "fovea", "arm": "gaze", "seed": seed,
                                                   "evaluation_interval": 1}, rows)
    _trial(tmp_path, "fovea_ppo_seed0", {"task": "fovea", "arm": "ppo", "seed": 0, "evaluation_interval": 1},
           [{"training_iteration": 1, "num_env_steps_sampled_lifetime": 1000,
             "evaluation": {"env_runners": {"success_once": 0.0}}, "learners": {"default_policy": {}}}])
    markdown = write_report(str(tmp_path), reps=REPS)
    # last iteration, mean over seeds: distance (0.2 + 0.4) / 2, agreement (0.5 + 0.6) / 2; ppo logs none
    assert "| gaze | 0.300 | 0.800 | 0.550 |" in markdown   # the gaze's centre is not a column
    series = learner_series(str(tmp_path))   # but it is in the series that exports keep
    centre = [m["gaze_mu_x_mean"] for _, m in series[("fovea", "gaze")][1]]
    assert centre == pytest.approx([-0.1 * i for i in range(1, 7)])
    assert "| ppo |" not in markdown.split("What the gaze objective did")[1]
    png = tmp_path / "gaze_fovea.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![fovea gaze-to-target distance](gaze_fovea.png)" in markdown


def test_export_writes_every_trials_numbers_as_gzipped_json_lines(experiment, tmp_path_factory):
    import gzip

    path = tmp_path_factory.mktemp("export") / "runs.jsonl.gz"
    from rllib_gaze.report import main

    main([str(experiment), "--out", str(path.parent), "--export", str(path), "--reps", str(REPS)])
    trials = [json.loads(line) for line in gzip.open(path, "rt")]
    assert len(trials) == len(CURVES)
    gaze0 = next(t for t in trials if (t["task"], t["arm"], t["seed"]) == ("clutter", "gaze", 0))
    assert [v for _, _, v in gaze0["evaluations"]] == CURVES[("clutter", "gaze", 0)]


def test_sac_arms_are_compared_with_plain_sac(experiment):
    """The same curves under SAC arm names: plain sac is the baseline, as ppo is for PPO's arms."""
    curves, _ = load_curves(str(experiment))
    clutter = [c for c in curves if c.task == "clutter" and c.arm in ("ppo", "gaze")]
    for curve in clutter:
        curve.arm = {"ppo": "sac", "gaze": "gaze-sac"}[curve.arm]
    markdown = table(clutter, (0.5, 0.8))
    assert "ratio vs sac at 50%" in markdown and "ratio vs ppo" not in markdown
    assert _rows(markdown)["gaze-sac"][4:6] == ["3.00", "2.00"]
