"""Offline mechanism bench: can the return-guided objective find the relevant place at all?

No Ray, no RL: only the gaze head is trained, with the project's own memory, mining and losses
(``rllib_gaze.contrastive``), on feature maps whose relevant places are known. Each run prints the
**localisation ratio**: the mean distance from the gaze centre to the nearest relevant place,
divided by a fixed central gaze's (1.0 = no better than looking at the centre; lower is better),
over training steps, with the label agreement (share of anchors whose label equals their nearest
neighbour's: 0.5 is chance) and the steps to reach ratio 0.5.

Sources of maps (``SOURCES``):
- synthetic families (16 channels, 8 x 8 cells, non-negative, twelve clutter objects):
  ``fixed`` (the target's state decides the return; the target sits at one fixed cell),
  ``moving`` (the same, the target anywhere, marked by its own channel pattern),
  ``relational`` (return 1 when an agent marker is within one cell of the target marker),
  ``conjunction`` (the target differs from distractors only by a combination of two features,
  as in ``clutter``; its state decides the return, distractors carry random states too),
  ``copies`` (32 scenes; neighbours share the scene and differ only in the target's state: the
  paper's "similar states"), ``relational-copies`` (32 scenes; the agent moves, the relation pays);
- ``fovea`` / ``clutter``: the project's diagnostics (``ClutterEnv`` with the suite's settings),
  played by a noisy scripted reach, encoded by a randomly initialised NatureCNN (the module's);
  relevant places: target and agent; ``signal``: the control diagnostic (``fovea`` whose target's
  colour shows the agent's closeness), relevant place: the target alone, where the return shows;
  ``fovea-still``, ``clutter-still``, ``fovea-centre``, ``fovea-corner``: the paper's kind of scene
  (distractors placed once per episode; the task in a central or an off-centre workspace);
- ``PushCube-v1`` / ``PullCube-v1`` and their ``-Clutter`` variants: real ManiSkill frames on
  ``physx_cpu`` from a noisy scripted push (``benchmarks/maniskill_frames.py``), every episode run
  to the time limit, encoded the same way; relevant places: cube and goal.

Places reach the map through the encoder's receptive fields (``rllib_gaze.gaze.MapRegistration``).

Recorded sources are split by episode: even episodes fill the memory, odd ones are the anchors, so
an anchor never finds itself; with ``--mining episode`` by step instead (even steps in the memory,
odd ones anchors) and an anchor's neighbours are the steps of its own episode: triplets that share
the scene. Their labels are the discounted return-to-go (gamma 0.8, ppo_rgb's), computed on a
recording that runs ``TAIL`` steps past the episode's horizon (those steps only feed the labels, so
the last steps' returns are not cut short); with ``--labels episode`` the whole episode's return, with
``--labels success`` whether the episode succeeded (1) or not (0).

Training runs ``--steps`` gaze updates (default 1,500, what a 98,304-step suite run on ``fovea``
gives the gaze: 96 iterations x 4 epochs x 4 minibatches); ``--triplet-gaze`` sets the paper's loss's
gaze: ``anchor`` (the anchor's gaze weighs all three maps) or ``each`` (a gaze per member).

By default each step draws its own anchors and the memory takes them after the step. With
``--epochs E --minibatches M --minibatch-rows R`` steps run as the learner's updates do: an update
draws ``M x R`` rows, each epoch splits them (shuffled after the first) into ``M`` minibatches, each
minibatch trains on ``anchors`` of its rows, and the memory takes the update's rows after it;
``--neighbours per_update`` then searches neighbours only in the first epoch and reuses them in the
later ones (``.gaze(mining_neighbours=...)``). The maps are fixed (no encoder trains here), so this
bench sees what reuse changes in which rows serve as anchors, not the encoder's drift within an update.

Objectives (``--objectives``): ``triplet`` (the paper's: triplet loss on glimpses under the
anchor's gaze), ``fixation`` (ours: the centre regressed onto the fixation search's cell,
``rllib_gaze.contrastive.fixation_targets``), ``fixation+triplet`` (both).

    python benchmarks/mechanism.py                      # every synthetic family x objective
    python benchmarks/mechanism.py --sources fovea clutter PushCube-v1 --labels step episode
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rllib_gaze.contrastive import (  # noqa: E402
    NEIGHBOURS,
    OBJECTIVES,
    TRIPLET_GAZES,
    FeatureReturnMemory,
    fixation_loss,
    fixation_targets,
    gaze_triplet_loss,
    mine_triplets,
    window_vote_targets,
)
from rllib_gaze.gaze import MapRegistration, build_gaze, cell_centres  # noqa: E402

CHANNELS, GRID, CLUTTER_OBJECTS = 16, 8, 12
SYNTHETIC = ("fixed", "moving", "relational", "conjunction", "copies", "relational-copies")
DIAGNOSTICS = ("fovea", "clutter", "signal", "fovea-still", "clutter-still", "fovea-centre", "fovea-corner")
MANISKILL = ("PushCube-v1", "PullCube-v1", "PushCube-v1-Clutter", "PullCube-v1-Clutter")
SOURCES = SYNTHETIC + DIAGNOSTICS + MANISKILL
LABELS = ("step", "episode", "success")
MINING = ("all", "episode")
GAMMA = 0.8  # ppo_rgb's discount: the learner's value targets look about this far ahead
HORIZON = 50  # steps of a recorded episode (the diagnostics' and the ManiSkill recordings' time limit)
TAIL = 20     # steps recorded past it for the return-to-go alone: GAMMA ** TAIL = 0.012
STEPS = 1500  # default gaze updates: what a 98,304-step fovea run gives the gaze


@dataclass
class Maps:
    """Feature maps with what they are about: ``maps (N, C, H, W)``, ``returns (N,)``, the
    relevant places ``places (N, P, 2)`` as (x, y) in the map's normalised coordinates (-1, 1),
    and for recorded rows their episode ``groups (N,)`` and step in it ``steps (N,)``."""

    maps: torch.Tensor
    returns: torch.Tensor
    places: torch.Tensor
    groups: torch.Tensor | None = None   # (N,) episode of each recorded row
    steps: torch.Tensor | None = None    # (N,) its step in that episode

    def __getitem__(self, idx) -> Maps:
        return Maps(self.maps[idx], self.returns[idx], self.places[idx],
                    *(None if t is None else t[idx] for t in (self.groups, self.steps)))


# --- synthetic families ----------------------------------------------------------------------------
class Synthetic:
    """Draws ``Maps`` of one synthetic family (``SYNTHETIC``); every call new rows."""

    def __init__(self, family: str, seed: int):
        if family not in SYNTHETIC:
            raise ValueError(f"family={family!r}: allowed values are {SYNTHETIC}")
        self.family = family
        self.gen = torch.Generator().manual_seed(seed)
        g = torch.Generator().manual_seed(1000 + seed)
        # Channel patterns of the things in the scenes, as a CNN's detectors would give them: the
        # task's things each fire one channel of their own (states A and B, target and agent
        # markers, a colour, a shape), the clutter kinds random non-negative mixes of the other ten.
        own = torch.eye(CHANNELS)
        self.state = own[0:2]
        self.target, self.agent, self.colour, self.shape = own[2], own[3], own[4], own[5]
        clutter = torch.zeros(6, CHANNELS)
        clutter[:, 6:] = torch.rand(6, CHANNELS - 6, generator=g) ** 2
        self.clutter = clutter / clutter.amax(1, keepdim=True)
        # Scenes of the copies families: a clutter layout and a target cell each.
        self.scenes = [self._layout(g) for _ in range(32)]

    def _layout(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        cells = torch.randperm(GRID * GRID, generator=g)
        kinds = torch.randint(len(self.clutter), (CLUTTER_OBJECTS,), generator=g)
        return cells[1:1 + CLUTTER_OBJECTS], kinds, int(cells[0])

    def _rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen)

    def _randint(self, high: int, *shape) -> torch.Tensor:
        return torch.randint(high, shape, generator=self.gen)

    def sample(self, n: int) -> Maps:
        maps = 0.05 * self._rand(n, CHANNELS, GRID * GRID)   # background
        rows = torch.arange(n)
        free = self._rand(n, GRID * GRID).argsort(1)          # distinct random cells per row
        state = self._randint(2, n)
        if self.family in ("copies", "relational-copies"):
            scene = self._randint(len(self.scenes), n)
            # Each object's strength varies from row to row (x 0.5 to 1.5), as lighting and pose
            # do: without it a row's nearest neighbours are its exact copies, all of one label.
            strength = 0.5 + self._rand(n, CLUTTER_OBJECTS)
            for i in range(n):
                cells, kinds, target_cell = self.scenes[int(scene[i])]
                maps[i][:, cells] += self.clutter[kinds].T * strength[i]
                free[i, 0] = target_cell
        else:
            kinds = self._randint(len(self.clutter), n, CLUTTER_OBJECTS)
            cells = free[:, 2:2 + CLUTTER_OBJECTS]
            maps[rows.view(-1, 1), :, cells] += self.clutter[kinds]
        target = free[:, 0]
        if self.family == "fixed":
            target = torch.full((n,), 2 * GRID + 5)
            maps[rows, :, target] = 0.05 * self._rand(n, CHANNELS)   # no clutter on the target
        places = [target]
        if self.family in ("fixed", "moving", "copies"):
            maps[rows, :, target] += self.state[state] + (self.target if self.family == "moving" else 0.0)
            returns = state.float()
        elif self.family == "conjunction":
            # Target = colour + shape; distractors have one of the two and another thing; every
            # object carries a random state, and only the target's pays.
            maps[rows, :, target] += self.colour + self.shape + self.state[state]
            half = CLUTTER_OBJECTS // 2
            cells = free[:, 2:2 + CLUTTER_OBJECTS]
            parts = torch.stack([self.colour + self.clutter[0], self.shape + self.clutter[1]])
            which = (torch.arange(CLUTTER_OBJECTS) >= half).long().expand(n, -1)
            maps[rows.view(-1, 1), :, cells] = (0.05 * self._rand(n, CLUTTER_OBJECTS, CHANNELS) + parts[which]
                                                + self.state[self._randint(2, n, CLUTTER_OBJECTS)])
            returns = state.float()
        else:  # relational families: the agent within one cell of the target pays
            near = self._rand(n) < 0.5
            agent = self._agent_cells(target, near)
            maps[rows, :, target] += self.target
            maps[rows, :, agent] += self.agent
            returns = near.float()
            places.append(agent)
        cells = torch.stack(places, 1)                                           # (N, P)
        xy = torch.stack([cells % GRID, cells // GRID], -1).float()
        return Maps(maps.view(n, CHANNELS, GRID, GRID),
                    returns + 0.05 * torch.randn(n, generator=self.gen),
                    (xy + 0.5) * (2.0 / GRID) - 1.0)

    def _agent_cells(self, target: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
        """An agent cell per row: a neighbour of ``target`` where ``near``, else >= 2 cells away."""
        ty, tx = target // GRID, target % GRID
        offsets = torch.tensor([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
        o = offsets[self._randint(len(offsets), target.numel())]
        ay, ax = (ty + o[:, 0]).clamp(0, GRID - 1), (tx + o[:, 1]).clamp(0, GRID - 1)
        on_target = (ay == ty) & (ax == tx)   # clamped onto the target at an edge: step the other way
        ay = torch.where(on_target, ty - o[:, 0], ay)
        ax = torch.where(on_target, tx - o[:, 1], ax)
        agent = ay * GRID + ax
        far = ~near
        agent[far] = self._randint(GRID * GRID, int(far.sum()))
        for _ in range(50):
            close = far & ((agent // GRID - ty).abs() <= 1) & ((agent % GRID - tx).abs() <= 1)
            if not close.any():
                break
            agent[close] = self._randint(GRID * GRID, int(close.sum()))
        return agent


# --- recorded sources --------------------------------------------------------------------------
def episode_labels(rewards: np.ndarray, episode: np.ndarray, labels: str, tail: np.ndarray | None = None,
                   success: np.ndarray | None = None) -> np.ndarray:
    """``(N,)`` labels of rows laid out episode by episode, steps in order: the discounted
    return-to-go with ``GAMMA`` over every row (``"step"``; ``tail (N,)`` marks the rows past the
    horizon, there only so that the return-to-go is not cut short), the summed reward of the rows
    before the tail (``"episode"``), or whether ``success (N,)`` held at any row before it
    (``"success"``: 1 or 0)."""
    out = np.zeros(len(rewards), dtype=np.float32)
    inside = np.ones(len(rewards), dtype=bool) if tail is None else ~tail
    for e in np.unique(episode):
        idx = np.flatnonzero(episode == e)
        if labels == "episode":
            out[idx] = rewards[idx][inside[idx]].sum()
            continue
        if labels == "success":
            out[idx] = float(success[idx][inside[idx]].any())
            continue
        following = 0.0
        for i in idx[::-1]:
            following = rewards[i] + GAMMA * following
            out[i] = following
    return out


def record_diagnostic(name: str, episodes: int, seed: int) -> dict[str, np.ndarray]:
    """Play a diagnostic of ``DIAGNOSTICS`` (the suite's settings) with a noisy scripted reach for
    ``HORIZON + TAIL`` steps (the env does not reset itself): images ``(N, S, S, 3)``, rewards,
    success flags, episode ids, ``tail`` (the rows past the horizon), and the places in [0, 1]:
    ``(N, 2, 2)`` [target, agent], or ``(N, 1, 2)`` [target] for ``signal``, whose return shows at the
    target alone."""
    from rllib_gaze.envs.clutter import ClutterEnv
    from rllib_gaze.suite import TASKS

    settings = {**TASKS[name].env_config, "include_state": True, "expose_target": True}
    env = ClutterEnv(num_envs=episodes, seed=seed, **settings)
    gen = torch.Generator().manual_seed(seed)
    obs, _ = env.reset()
    # Per-episode skill: how much of each action is the true direction (the rest is noise), so
    # some episodes reach the target and some never do.
    skill = torch.rand(episodes, 1, generator=gen)
    out = {"images": [], "rewards": [], "places": [], "success": []}
    for _ in range(HORIZON + TAIL):
        direction = obs["target"] - obs["state"]
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-6)
        action = skill * direction + (1 - skill) * (2 * torch.rand(episodes, 2, generator=gen) - 1)
        out["images"].append(obs["rgb"].clone())
        places = [obs["target"]] if settings.get("target_signal") else [obs["target"], obs["state"]]
        out["places"].append(torch.stack(places, 1))
        obs, reward, _, _, info = env.step(action)
        out["rewards"].append(reward)
        out["success"].append(info["success"])
    # (T, E, ...) -> episode-major rows
    rows = {key: torch.stack(value, 1).flatten(0, 1).numpy() for key, value in out.items()}
    steps = np.tile(np.arange(HORIZON + TAIL), episodes)
    return {**rows, "episode": np.repeat(np.arange(episodes), HORIZON + TAIL), "tail": steps >= HORIZON}


def encode(images: np.ndarray, seed: int, checkpoint: str | None = None,
           batch: int = 256) -> tuple[torch.Tensor, MapRegistration]:
    """``(N, S, S, 3)`` uint8 -> ``(N, 64, h, w)`` pre-attention maps of a ``GazePPOModule`` and where
    image points fall on them: the trained module of an algorithm ``checkpoint`` (a suite trial's
    ``checkpoint_0000NN``), or a fresh one (its NatureCNN as at the start of training)."""
    if checkpoint:
        from rllib_gaze.visualize import load_checkpoint

        module = load_checkpoint(checkpoint)[0]
    else:
        import gymnasium as gym

        from rllib_gaze.module import GazePPOModule

        torch.manual_seed(seed)
        module = GazePPOModule(observation_space=gym.spaces.Box(0, 255, images.shape[1:], np.uint8),
                               action_space=gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
                               model_config={"attention": "none"})
    with torch.no_grad():
        maps = torch.cat([module.feature_map({"rgb": torch.as_tensor(images[i:i + batch])})
                          for i in range(0, len(images), batch)])
    return maps, module.map_registration


@functools.lru_cache(maxsize=4)
def recorded(source: str, labels: str, seed: int, episodes: int, checkpoint: str | None = None,
             mining: str = "all") -> tuple[Maps, Maps]:
    """(memory rows, anchor rows) of a recorded source (kept for the next objective on it): split
    by episode parity (``mining="all"``: an anchor's neighbours come from other episodes), or by
    step parity (``"episode"``: its neighbours are the other steps of its own episode)."""
    if source in DIAGNOSTICS:
        rec = record_diagnostic(source, episodes, seed)
    else:
        from benchmarks.maniskill_frames import record_maniskill

        r = record_maniskill(source, episodes=episodes, seed=seed, max_steps=HORIZON + TAIL, full_episodes=True,
                             cache_dir=str(Path(__file__).resolve().parent / ".cache"))
        rec = {"images": r.images, "places": r.places, "rewards": r.rewards, "episode": r.episode,
               "success": r.success, "tail": r.step >= HORIZON}
    returns = episode_labels(rec["rewards"], rec["episode"], labels, rec["tail"], rec["success"])
    keep = ~rec["tail"]   # the tail's rows gave their rewards to the labels; they are not mined
    maps, registration = encode(rec["images"][keep], seed, checkpoint)
    returns = torch.as_tensor(returns[keep])
    places = registration.image_to_map(torch.as_tensor(rec["places"][keep]).float())
    episode = torch.as_tensor(rec["episode"][keep])
    first = torch.searchsorted(episode, episode)   # rows are episode-major: each episode's first row
    data = Maps(maps, returns, places, episode, torch.arange(len(episode)) - first)
    if mining == "episode":
        odd = torch.arange(len(episode)) % 2 == 1
    else:
        odd = episode % 2 == 1
    return data[~odd], data[odd]


# --- training --------------------------------------------------------------------------------------
@dataclass
class Run:
    """One bench run: the localisation ratio at each logged step, label agreement, share of anchors
    with both a positive and a negative among their neighbours, the gaze's final mean sigma."""

    source: str
    objective: str
    labels: str
    steps: list[int]
    ratios: list[float]
    agreement: float
    valid: float
    sigma: float
    centre_distance: float  # the central gaze's mean distance to the nearest place (the ratio's unit)

    def steps_to(self, level: float = 0.5) -> int | None:
        return next((s for s, r in zip(self.steps, self.ratios) if r <= level), None)


def nearest_place(centres: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """``(N,)`` distance of each of ``centres (N, 2)`` to the nearest of ``places (N, P, 2)``; a
    NaN place (behind the camera) does not count, and a row with none in view gets ``inf``."""
    return (places - centres.unsqueeze(1)).norm(dim=2).nan_to_num(nan=math.inf).amin(1)


def localisation_ratio(centres: torch.Tensor, places: torch.Tensor) -> float:
    """Mean distance of ``centres (N, 2)`` to the nearest of ``places (N, P, 2)`` over a central
    gaze's, over the rows with a place in view."""
    gaze, centre = nearest_place(centres, places), nearest_place(torch.zeros_like(centres), places)
    seen = centre.isfinite()
    return float(gaze[seen].mean() / centre[seen].mean())


def train(source: str, objective: str, *, labels: str = "step", steps: int = STEPS, anchors: int = 256,
          capacity: int = 4096, k: int = 16, margin: float = 0.2, lr: float = 1e-3, seed: int = 0,
          episodes: int = 64, log_every: int = 50, pools: tuple[int, ...] = (1,),
          checkpoint: str | None = None, mining: str = "all", gap: int = 0, triplet_gaze: str = "anchor",
          epochs: int = 1, minibatches: int = 1, minibatch_rows: int | None = None,
          neighbours: str = "per_minibatch") -> Run:
    """Train a fresh foveal gaze (the project's defaults) on ``source`` with ``objective``; a
    recorded source is encoded by ``checkpoint``'s module (default: a freshly initialised one) and
    mined across episodes or, with ``mining="episode"``, within each anchor's own episode, and
    with ``gap`` only from rows at least that many steps from the anchor's. ``triplet_gaze``: the
    triplet loss's gaze (``TRIPLET_GAZES``). ``epochs``, ``minibatches``, ``minibatch_rows``
    (default ``anchors``) and ``neighbours`` (``NEIGHBOURS``): the learner's updates (module
    docstring); the defaults give one step per update, all of its rows anchors."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: allowed values are {OBJECTIVES}")
    if triplet_gaze not in TRIPLET_GAZES:
        raise ValueError(f"triplet_gaze={triplet_gaze!r}: allowed values are {TRIPLET_GAZES}")
    if labels not in LABELS:
        raise ValueError(f"labels={labels!r}: allowed values are {LABELS}")
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: allowed values are {SOURCES}")
    if mining not in MINING or (mining != "all" and source in SYNTHETIC):
        raise ValueError(f"mining={mining!r}: allowed values are {MINING} ('episode' for recorded sources only)")
    if gap < 0 or (gap and source in SYNTHETIC):
        raise ValueError(f"gap={gap!r}: must be >= 0 (and 0 for synthetic sources, which have no steps)")
    minibatch_rows = anchors if minibatch_rows is None else minibatch_rows
    if epochs < 1 or minibatches < 1 or minibatch_rows < anchors:
        raise ValueError(f"epochs={epochs!r}, minibatches={minibatches!r}: must be >= 1; minibatch_rows="
                         f"{minibatch_rows!r}: must be >= anchors ({anchors})")
    if neighbours not in NEIGHBOURS:
        raise ValueError(f"neighbours={neighbours!r}: allowed values are {NEIGHBOURS}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if source in SYNTHETIC:
        family = Synthetic(source, seed)
        bank, draw = family.sample(capacity), family.sample
    else:
        bank, queries = recorded(source, labels, seed, episodes, checkpoint, mining)
        def draw(n: int) -> Maps:
            return queries[torch.randint(len(queries.maps), (n,), generator=gen)]
    probe = draw(1024)
    _, c, h, w = bank.maps.shape
    gaze = build_gaze({"attention": "foveal"}, c, h, w)
    optimizer = torch.optim.Adam(gaze.parameters(), lr=lr, eps=1e-8)
    memory = FeatureReturnMemory(capacity, (c, h, w), pool=2)
    memory.push(bank.maps, bank.returns)

    def ratio() -> float:
        with torch.no_grad():
            return localisation_ratio(gaze.attention_map(probe.maps)[1][:, :2], probe.places)

    def label_stats() -> tuple[float, torch.Tensor]:  # median return and mean map of the memory
        maps, _, returns = memory.filled()
        return float(torch.quantile(returns, 0.5)), maps.mean(0)

    threshold, mean_map = label_stats()   # a recorded source's memory never changes
    log_steps, ratios, agreements, valid = [0], [ratio()], [], []

    def anchors_of(rows: int):
        """Each step's anchors, rows of an update of ``rows`` rows, and whether they reuse the
        neighbours found for them earlier in the update (``neighbours="per_update"``, epochs > 1)."""
        searched = torch.zeros(rows, dtype=torch.bool)
        for epoch in range(epochs):
            order = torch.arange(rows) if epoch == 0 else torch.randperm(rows, generator=gen)
            for m in range(minibatches):
                idx = order[m * minibatch_rows:(m + 1) * minibatch_rows]
                if neighbours == "per_update" and epoch > 0:   # the rows searched earlier, a random draw of them
                    seen = idx[searched[idx]]
                    yield seen[torch.randperm(len(seen), generator=gen)[:anchors]], True
                    continue
                picked = idx if len(idx) <= anchors else idx[torch.randperm(len(idx), generator=gen)[:anchors]]
                searched[picked] = True
                yield picked, False

    step = 0
    while step < steps:
        update = draw(minibatches * minibatch_rows)
        found = torch.full((len(update.maps), 2), -1)   # each row's positive and negative (-1: no triplet)
        for rows, reuse in anchors_of(len(update.maps)):
            if step == steps:
                break
            step += 1
            batch = update[rows]
            if reuse:
                anchor = (found[rows, 0] >= 0).nonzero().squeeze(1)
                positive, negative = found[rows[anchor]].unbind(1)
                valid.append(anchor.numel() / max(len(rows), 1))
            else:
                groups = None if mining == "all" else (batch.groups, bank.groups)
                apart = (batch.steps, bank.steps, gap) if gap else None
                triplets = mine_triplets(batch.maps, batch.returns, memory, k=k, threshold=threshold,
                                         groups=groups, apart=apart)
                agreements.append(triplets.label_agreement)
                valid.append(triplets.valid_fraction)
                anchor, positive, negative = triplets.anchor, triplets.positive, triplets.negative
                found[rows[anchor]] = torch.stack([positive, negative], 1)
            if anchor.numel():
                a = batch.maps[anchor]
                p, n = memory.maps[positive], memory.maps[negative]
                loss = a.new_zeros(())
                if objective != "fixation":
                    loss = loss + gaze_triplet_loss(gaze.attention_map, a, p, n, similarity="glimpse",
                                                    triplet_gaze=triplet_gaze, margin=margin, mean_map=mean_map)[0]
                if objective != "triplet":
                    centres, _ = fixation_targets(a - mean_map, p - mean_map, n - mean_map, pools)
                    loss = loss + fixation_loss(gaze.attention_map(a)[1], centres)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if step % log_every == 0:
                log_steps.append(step)
                ratios.append(ratio())
        if source in SYNTHETIC:   # the learner's order: mined against earlier rows, then pushed
            memory.push(update.maps, update.returns)
            threshold, mean_map = label_stats()
    with torch.no_grad():
        sigma = float(gaze.attention_map(probe.maps)[1][:, 2:4].mean())
    centre = nearest_place(probe.places.new_zeros(len(probe.places), 2), probe.places)
    centre_distance = float(centre[centre.isfinite()].mean())
    name = f"triplet ({triplet_gaze})" if objective == "triplet" else f"{objective} {pools}"
    if objective == "fixation+triplet":
        name += f" ({triplet_gaze})"
    if epochs > 1 or minibatches > 1:
        name += f", {epochs} x {minibatches} x {minibatch_rows} rows, {neighbours}"
    source = (source + (" (trained)" if checkpoint else "") + (", own episode" if mining == "episode" else "")
              + (f", >= {gap} steps apart" if gap else ""))
    return Run(source, name, labels, log_steps, ratios, float(np.nanmean(agreements)), float(np.mean(valid)), sigma,
               centre_distance)


def within(centres: torch.Tensor, places: torch.Tensor, radius: float = 0.3) -> float:
    """Share of the rows with a place in view whose ``centres (N, 2)`` lie within ``radius`` of one."""
    distance = nearest_place(centres, places)
    seen = nearest_place(torch.zeros_like(centres), places).isfinite()
    return float((distance[seen] <= radius).float().mean())


def targets_alone(source: str, *, labels: str = "step", seed: int = 0, episodes: int = 64,
                  checkpoint: str | None = None, mining: str = "all", anchors: int = 128, bank_rows: int = 1024,
                  k: int = 32, pools: tuple[int, ...] = (1, 3)) -> dict[str, tuple[float, float]]:
    """Where each search sends the gaze before any training: the window vote (its ``k`` nearest
    windows over ``bank_rows`` memory states, any place), the fixation search (on each anchor's
    mined triplet, ``mining`` as in ``train``) and a random cell, each as (localisation ratio,
    share of anchors within 0.3 of a relevant place) over ``anchors`` anchors."""
    gen = torch.Generator().manual_seed(seed)
    if source in SYNTHETIC:
        family = Synthetic(source, seed)
        bank, batch = family.sample(4096), family.sample(anchors)
    else:
        bank, queries = recorded(source, labels, seed, episodes, checkpoint, mining)
        batch = queries[torch.randperm(len(queries.maps), generator=gen)[:anchors]]
    threshold = float(torch.quantile(bank.returns, 0.5))
    mean_map = bank.maps.mean(0)
    rows = torch.randperm(len(bank.maps), generator=gen)[:bank_rows]
    vote, _ = window_vote_targets(batch.maps - mean_map, batch.returns >= threshold, bank.maps[rows] - mean_map,
                                  bank.returns[rows] >= threshold, k=k)
    memory = FeatureReturnMemory(len(bank.maps), bank.maps.shape[1:], pool=2)
    memory.push(bank.maps, bank.returns)
    triplets = mine_triplets(batch.maps, batch.returns, memory, k=16, threshold=threshold,
                             groups=None if mining == "all" else (batch.groups, bank.groups))
    a = triplets.anchor
    fixation, _ = fixation_targets(batch.maps[a] - mean_map, memory.maps[triplets.positive] - mean_map,
                                   memory.maps[triplets.negative] - mean_map, pools)
    h, w = bank.maps.shape[-2:]
    ys, xs = cell_centres(h, w)
    cell = torch.randint(h * w, (len(batch.maps),), generator=gen)
    random = torch.stack([xs[cell % w], ys[cell // w]], 1)
    return {name: (localisation_ratio(c, p), within(c, p))
            for name, c, p in (("window vote", vote, batch.places), ("fixation search", fixation, batch.places[a]),
                               ("random cell", random, batch.places))}


def table(runs: list[Run]) -> str:
    """Markdown table of ``runs``: ratio at a few steps, steps to 0.5, agreement, final sigma."""
    marks = sorted({s for r in runs for s in r.steps if s in (0, 100, 400, 800) or s == r.steps[-1]})
    head = ("| source | labels | objective | " + " | ".join(f"ratio@{s}" for s in marks)
            + " | steps to 0.5 | label agreement | valid anchors | final sigma | central gaze's distance |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        at = dict(zip(r.steps, r.ratios))
        cells = " | ".join(f"{at[s]:.2f}" if s in at else "" for s in marks)
        lines.append(f"| {r.source} | {r.labels} | {r.objective} | {cells} | {r.steps_to() or '-'} | "
                     f"{r.agreement:.2f} | {r.valid:.2f} | {r.sigma:.2f} | {r.centre_distance:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="+", default=list(SYNTHETIC), choices=SOURCES)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--labels", nargs="+", default=["step"], choices=LABELS,
                        help="recorded sources only: return-to-go or whole-episode return")
    parser.add_argument("--steps", type=int, default=STEPS, help="gaze updates per run (default: what an RL run "
                                                                  "on fovea gives the gaze)")
    parser.add_argument("--triplet-gaze", nargs="+", default=["anchor"], choices=TRIPLET_GAZES,
                        help="triplet objectives: the anchor's gaze on all three maps, or a gaze per member")
    parser.add_argument("--pools", type=int, nargs="+", action="append",
                        help="fixation objectives: the windows of the search (repeat for several settings); "
                             "default: 1, and 1 3")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--episodes", type=int, default=64, help="episodes recorded per recorded source")
    parser.add_argument("--mining", nargs="+", default=["all"], choices=MINING,
                        help="recorded sources: neighbours from other episodes, or from the anchor's own")
    parser.add_argument("--gaps", type=int, nargs="+", default=[0],
                        help="recorded sources: neighbours at least this many steps from the anchor (0: any)")
    parser.add_argument("--targets", action="store_true",
                        help="no training: where the window vote, the fixation search and a random cell would send "
                             "the gaze on each source (ratio / share within 0.3 of a relevant place)")
    parser.add_argument("--epochs", type=int, default=1, help="steps run as the learner's updates: epochs per update")
    parser.add_argument("--minibatches", type=int, default=1, help="minibatches per epoch")
    parser.add_argument("--minibatch-rows", type=int, default=None,
                        help="rows per minibatch, of which 256 are anchors (default: 256, all of them)")
    parser.add_argument("--neighbours", nargs="+", default=["per_minibatch"], choices=NEIGHBOURS,
                        help="with --epochs > 1: search every minibatch's anchors, or only the first epoch's and "
                             "reuse them (.gaze(mining_neighbours=...))")
    parser.add_argument("--checkpoint", help="recorded sources: encode with this trained algorithm checkpoint's "
                                             "module (a suite trial's checkpoint_0000NN) instead of a fresh one")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small ops: one thread is as fast, and leaves the other core to a run beside it
    if args.targets:
        print("| source | mining | seed | window vote | fixation search | random cell |\n|---|---|---|---|---|---|")
        for source in args.sources:
            for mining in (["all"] if source in SYNTHETIC else args.mining):
                for seed in args.seeds:
                    found = targets_alone(source, labels=args.labels[0], seed=seed, episodes=args.episodes,
                                          checkpoint=args.checkpoint, mining=mining)
                    print(f"| {source}{' (trained)' if args.checkpoint else ''} | {mining} | {seed} | "
                          + " | ".join(f"{r:.2f} / {share:.2f}" for r, share in found.values()) + " |", flush=True)
        return
    runs = []
    for source, mining, gap in [(s, m, g) for s in args.sources for m in (["all"] if s in SYNTHETIC else args.mining)
                                for g in ([0] if s in SYNTHETIC else args.gaps)]:
        for labels in (args.labels if source not in SYNTHETIC else ["step"]):
            for objective, pools, triplet_gaze in [
                    (o, tuple(p), t) for o in args.objectives
                    for p in ([[1]] if o == "triplet" else args.pools or [[1], [1, 3]])
                    for t in (["anchor"] if o == "fixation" else args.triplet_gaze)]:
                for seed, neighbours in [(s, n) for s in args.seeds for n in args.neighbours]:
                    start = time.perf_counter()
                    run = train(source, objective, labels=labels, steps=args.steps, seed=seed,
                                episodes=args.episodes, pools=pools, checkpoint=args.checkpoint, mining=mining,
                                gap=gap, triplet_gaze=triplet_gaze, epochs=args.epochs, minibatches=args.minibatches,
                                minibatch_rows=args.minibatch_rows, neighbours=neighbours)
                    print(f"{source:18s} {labels:7s} {run.objective:24s} seed {seed}: ratio "
                          f"{run.ratios[0]:.2f} -> {run.ratios[-1]:.2f}, agreement {run.agreement:.2f}, "
                          f"sigma {run.sigma:.2f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
                    runs.append(run)
    print(table(runs))


if __name__ == "__main__":
    main()
