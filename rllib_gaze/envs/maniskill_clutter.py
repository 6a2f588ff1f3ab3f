"""Visually cluttered variants of ManiSkill tasks: random primitive objects that only show.

The paper's gains are larger in cluttered scenes. A variant adds ``clutter`` boxes and spheres of
random colours and sizes, re-placed at random on the table every episode. They have visual shapes
only (no collision shape, kinematic), so physics, task logic and reward are exactly the base
task's: only the camera image changes.
"""

from __future__ import annotations

import numpy as np
import sapien
import torch

CLUTTER_SUFFIX = "-Clutter"
# Where distractors may stand: the table area the tabletop tasks' cameras look at (metres).
_HALF_EXTENT_XY = (0.25, 0.35)


def _cluttered_class(base: type) -> type:
    class Cluttered(base):
        def __init__(self, *args, clutter: int = 4, **kwargs):
            if clutter < 0:
                raise ValueError(f"clutter={clutter!r}: must be >= 0")
            self.clutter = clutter
            super().__init__(*args, **kwargs)

        def _load_scene(self, options: dict):
            super()._load_scene(options)
            rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()))
            self._clutter_actors, self._clutter_heights = [], []
            for k in range(self.clutter):
                size = float(rng.uniform(0.012, 0.035))
                colour = [*rng.uniform(0.05, 0.95, 3), 1.0]
                builder = self.scene.create_actor_builder()
                material = sapien.render.RenderMaterial(base_color=colour)
                if k % 2 == 0:
                    builder.add_box_visual(half_size=[size, size * rng.uniform(0.6, 1.4), size], material=material)
                else:
                    builder.add_sphere_visual(radius=size, material=material)
                builder.initial_pose = sapien.Pose(p=[0.0, 0.0, -1.0 - k])  # below the floor until placed
                self._clutter_actors.append(builder.build_kinematic(name=f"clutter_{k}"))
                self._clutter_heights.append(size)

        def _initialize_episode(self, env_idx: torch.Tensor, options: dict):
            super()._initialize_episode(env_idx, options)
            from mani_skill.utils.structs import Pose

            with torch.device(self.device):
                b = len(env_idx)
                extent = torch.tensor(_HALF_EXTENT_XY)
                for actor, height in zip(self._clutter_actors, self._clutter_heights):
                    xyz = torch.zeros(b, 3)
                    xyz[:, :2] = (torch.rand(b, 2) * 2 - 1) * extent
                    xyz[:, 2] = height
                    actor.set_pose(Pose.create_from_pq(p=xyz))

    Cluttered.__name__ = Cluttered.__qualname__ = f"Cluttered{base.__name__}"
    return Cluttered


def cluttered_env_id(env_id: str) -> str:
    """Register (once) the cluttered variant of ``env_id`` with ManiSkill and gymnasium; its id.

    Make it with ``gym.make(cluttered_env_id(env_id), clutter=N, ...)``.
    """
    from mani_skill.utils.registration import REGISTERED_ENVS, register_env

    new_id = env_id + CLUTTER_SUFFIX
    if new_id not in REGISTERED_ENVS:
        spec = REGISTERED_ENVS[env_id]
        register_env(new_id, max_episode_steps=spec.max_episode_steps, **(spec.default_kwargs or {}))(
            _cluttered_class(spec.cls))
    return new_id
