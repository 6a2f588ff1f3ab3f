"""A one-off probe of issue 21, kept as the record of docs/results.md (not a maintained tool): do the
mechanism bench's objectives localise the `signal` control's target when the signal is made more
salient? Variants of ``ClutterEnv._observe`` (patched here only): ``ring`` (the env's own signal),
``binary`` (yellow only when closeness > 0.4), ``filled-lit`` (the target also filled when lit), and
``*-flatbg`` (a flat grey background instead of the per-episode hue). 300 steps, seed 0.

    python docs/results/probes/signal_variants.py binary filled-lit ring-flatbg binary-flatbg
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import mechanism  # noqa: E402

from rllib_gaze.envs import clutter  # noqa: E402


def observe_with(kind: str):
    def observe(self):
        n, s = self.num_envs, self.image_size
        background = torch.full_like(self.background, 100) if kind.endswith("flatbg") else self.background
        img = background.clone().view(n, s * s, 3)
        green = torch.tensor(clutter._TARGET_RGB, dtype=torch.uint8).expand(n, 3)
        red = torch.tensor(clutter._AGENT_RGB, dtype=torch.uint8).expand(n, 3)
        yes = torch.ones(n, dtype=torch.bool)
        for j in range(self.num_distractors):
            is_green = self.distractor_is_green[:, j]
            self._paint_square(img, self.distractors[:, j], ~is_green,
                               torch.where(is_green.view(-1, 1), green, red))
        closeness = (1.0 - torch.tanh(5.0 * (self.agent - self.target).norm(dim=-1))).view(-1, 1)
        if kind.startswith("binary"):
            closeness = (closeness > 0.4).float()
        signal = torch.tensor(clutter._SIGNAL_RGB).float()
        colour = (green.float() + closeness * (signal - green.float())).round().to(torch.uint8)
        hollow = (closeness.view(-1) < 0.4) if kind == "filled-lit" else yes
        self._paint_square(img, self.target, hollow, colour)
        self._paint_square(img, self.agent, ~yes, red)
        return {"rgb": img.view(n, s, s, 3), "state": self.agent.clone(), "target": self.target.clone()}
    return observe


for kind in sys.argv[1:]:
    clutter.ClutterEnv._observe = observe_with(kind)
    mechanism.recorded.cache_clear()
    for objective in ("triplet", "fixation"):
        run = mechanism.train("signal", objective, steps=300, seed=0)
        print(kind, objective, [round(r, 2) for r in run.ratios], "agreement", round(run.agreement, 2), flush=True)
