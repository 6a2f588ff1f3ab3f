"""`--plan`: what a launch asks for and costs, printed without starting Ray trials (rllib_gaze/plan.py).

Through ray job submit on a loopback cluster: tests/test_suite_job.py."""

from __future__ import annotations

import os
import re

import pytest

from rllib_gaze.cli import experiments, main, parse_args
from rllib_gaze.plan import H200_ROW_PASSES, H200_UPDATE_S, NODE_KINDS
from rllib_gaze.suite import PRESETS, planned_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_paper_plan_on_four_l4_nodes_counts_what_the_preset_holds(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, out, _ = _plan(capsys, "--preset", "paper", "--plan", "--plan-cluster", "4xL4")
    assert code == 0 and "[plan] cluster: 4xL4 described by --plan-cluster (GCP g2-standard-8" in out
    for algo, preset in experiments(parse_args(["--preset", "paper"]), "paper").items():
        n = len(preset.tasks) * len(preset.arms) * len(preset.seeds)
        assert (f"[plan] paper ({algo}): {n} trials = {len(preset.tasks)} tasks x {len(preset.arms)} arms "
                f"{list(preset.arms)} x {len(preset.seeds)} seeds") in out
        assert f"{planned_steps(preset):,} env steps in all" in out
        assert f"{n} trial(s) ask for 3 CPU and 1 GPU" in out  # docs/cluster.md's per-trial figure
    assert (len(PRESETS["paper"].tasks), len(PRESETS["paper"].arms)) == (14, 4)
    assert "env runners 1 x 256 envs, evaluation 1 x 16 envs" in out
    assert out.count("at once on that cluster: 4 trial(s)") == 2  # one GPU per trial, one per node
    assert out.count("every trial fits the cluster") == 2
    assert "time, a lower bound: wall >= " in out and "patch at gaze's" in out  # says which figure stands in
    assert "(sac): 24 trials" in out and "time: no estimate" in out  # no SAC figure was measured on a GPU
    wall, gpu_hours = re.search(r"wall >= (\S+), >= (\S+) GPU-hours", out).groups()
    doc = " ".join(open(os.path.join(ROOT, "docs", "cluster.md")).read().split())
    assert f"4 at once, wall >= {wall} and >= {gpu_hours} GPU-hours" in doc  # what docs/cluster.md quotes


def test_the_time_is_the_h200_figure_scaled_to_the_trials_updates(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, out, _ = _plan(capsys, "--preset", "paper", "--plan-cluster", "1xA10G", "--tasks", "PickCube-v1",
                         "--arms", "ppo", "gaze", "--seeds", "0")
    # PickCube-v1: 256 envs x 50 steps = 12,800 rows per iteration, 10M steps -> 790 iterations (whole
    # evaluation intervals) x 8 epochs = 80,896,000 rows x epochs = 790 x the H200's 102,400:
    # ppo 790 x 1.935 s, gaze 790 x 4.105 s: 4,771.6 s, one after the other on one node, 1 GPU each
    assert H200_ROW_PASSES == 102_400 and (H200_UPDATE_S["ppo"], H200_UPDATE_S["gaze"]) == (1.935, 4.105)
    assert code == 0 and "wall >= 1h20m, >= 1.3 GPU-hours" in out


def test_the_figure_is_the_one_docs_benchmarks_md_measured():
    text = open(os.path.join(ROOT, "docs", "benchmarks.md")).read()
    section = text[text.index("## On a GPU (H200, 2026-11-26)"):]
    section = section[:section.index("\n## ")]
    assert "python benchmarks/bench.py overhead --device cuda --batch 25600 --epochs 4" in section
    for arm, seconds in H200_UPDATE_S.items():
        assert re.search(rf"^\| {re.escape(arm)}( \(.*\))? \| {seconds:.3f} s \|", section, re.M), arm


def test_docs_cluster_md_lists_the_kinds_as_the_plan_counts_them():
    doc = open(os.path.join(ROOT, "docs", "cluster.md")).read()
    for kind, node in NODE_KINDS.items():
        assert re.search(rf"^\| `{re.escape(kind)}` \| .* \| {node.cpus:g} \| {node.gpus:g} \|$", doc, re.M), kind


def test_a_trial_the_cluster_cannot_hold_is_refused_naming_the_resource(capsys):
    code, out, _ = _plan(capsys, "--preset", "paper", "--algo", "ppo", "--plan-cluster", "2xL4",
                         "--gpus-per-learner", "1.5")
    assert code == 1 and "at once on that cluster: 0 trial(s)" in out
    assert re.search(r"refused: \S+/\S+/seed\d asks for 2 GPU \(bundles .*'GPU': 1\.5.*\), and the cluster has "
                     r"2 GPU in all, at most 1 on one node", out)


@pytest.mark.parametrize("value", ["4xV100", "0xL4", "L4", "4x", "x4L4"])
def test_bad_plan_cluster_values_are_refused_naming_the_value_and_what_is_allowed(capsys, value):
    code, out, err = _plan(capsys, "--preset", "paper", "--plan-cluster", value)
    assert code == 2 and not out
    assert f"--plan-cluster {value!r}: expected NxKIND, N >= 1 nodes of a KIND in {list(NODE_KINDS)}" in err


def test_with_no_cluster_to_join_the_plan_is_for_this_machine(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, out, _ = _plan(capsys, "--preset", "local", "--plan")
    assert code == 0 and "RAY_ADDRESS is unset, so the run would start a local Ray here" in out
    assert "12 trial(s) ask for 1 CPU and 0 GPU" in out  # no env runners: sampling in the trial's process
    assert f"at once on that cluster: {min(os.cpu_count(), 12)} trial(s)" in out
    # the laptop's RAY_ADDRESS for `ray job submit` is the job server, which this command cannot join
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    code, out, _ = _plan(capsys, "--preset", "local", "--plan")
    assert code == 1 and "is a job server, not a cluster this command joins" in out
    assert "the cluster has 0 CPU in all" in out


def test_plan_and_resume_do_not_mix(capsys, tmp_path):
    code, _, err = _plan(capsys, "--resume", "x", "--storage-path", str(tmp_path), "--plan")
    assert code == 2 and "drop --plan" in err
