"""ManiSkill3 tasks as batched envs for RLlib (through ``BatchedEnvBridge``).

- GPU (``sim_backend="physx_cuda"``): one ManiSkill env object simulates and renders all
  ``num_envs`` sub-envs of an env runner (ManiSkill's own batching).
- CPU (``"physx_cpu"``): ManiSkill allows one sub-env per env object there, so ``CPUBatch``
  holds ``num_envs`` objects behind the same batched API.

Observations are ppo_rgb's: ``{"rgb": (N, S, S, 3) uint8, "state": (N, D) float32}`` from
``FlattenRGBDObservationWrapper`` (camera size ``S``, default 128); actions ``pd_joint_delta_pos``.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

VULKAN_HELP = (
    "ManiSkill renders camera observations through Vulkan and found no usable Vulkan device. "
    "Without a GPU, install Mesa >= 24.3 lavapipe (Debian 12: `apt-get install -t bookworm-backports "
    "mesa-vulkan-drivers libvulkan1`; scripts/setup.sh does this); on NVIDIA GPU nodes install "
    "libvulkan1 and the NVIDIA driver's Vulkan ICD. Check with `vulkaninfo --summary`."
)
SIM_BACKENDS = ("auto", "physx_cuda", "physx_cpu")
# The lowest NVIDIA driver branch that runs each CUDA major (NVIDIA's "CUDA Compatibility", minor version
# compatibility: CUDA 12.x from 525, CUDA 13.x from 580). torch's pip wheels bring their own CUDA runtime,
# so the node's driver is the only CUDA piece that the image decides.
MIN_DRIVER = {12: 525, 13: 580}
GPU_CONSTRAINTS = "cluster/gpu-constraints.txt"


def nvidia_driver() -> str | None:
    """The version of the NVIDIA kernel driver loaded on this machine (in a container: the node's), or None."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return found.group(1) if found else None


def no_cuda_reason(driver: str | None, torch_version: str, torch_cuda: str | None) -> str:
    """Why torch sees no GPU, from the node's NVIDIA driver and torch's CUDA build, and what to do. Said by the
    GPU workers' set-up check (cluster/*.yaml), whose failure makes Ray's autoscaler replace the node with one
    of the same image, which fails the same way: the fix is the image or the pin, not another node."""
    if torch_cuda is None:
        why = f"torch {torch_version} is a CPU build; install its CUDA build ({GPU_CONSTRAINTS} pins one)"
    elif driver is None:
        why = (f"torch {torch_version} is built for CUDA {torch_cuda}, but no NVIDIA driver is loaded "
               "(/proc/driver/nvidia/version is absent): a node without a GPU, or a driver not installed yet")
    else:
        need = MIN_DRIVER.get(int(torch_cuda.split(".")[0]))
        if need is not None and int(driver.split(".")[0]) < need:
            why = (f"torch {torch_version} is built for CUDA {torch_cuda}, which needs NVIDIA driver >= {need}, and "
                   f"this node's driver is {driver}: install the torch {GPU_CONSTRAINTS} pins, or use an image "
                   f"whose driver is >= {need}")
        else:
            why = (f"torch {torch_version} (CUDA {torch_cuda}) should run on this node's NVIDIA driver {driver}, "
                   "yet sees no GPU: check CUDA_VISIBLE_DEVICES and `nvidia-smi`")
    return why + ". A new node of the same image fails the same way: stop the cluster and fix the image or the pin"


def enable_physx_gpu() -> None:
    """Loads SAPIEN's PhysX GPU library, which ``physx_cuda`` needs. The library must be in place already
    (``physx_gpu.check``: the cluster files fetch it before Ray starts), so no env runner downloads it;
    raises naming the file and the fix when it is missing, cut short or will not load."""
    import sapien.physx

    from rllib_gaze.envs import physx_gpu

    if sapien.physx.is_gpu_enabled():
        return
    physx_gpu.check()
    try:
        sapien.physx.enable_gpu()
    except Exception as error:  # a library that will not load (wrong platform, no CUDA driver)
        raise RuntimeError(
            f"sim_backend='physx_cuda' needs SAPIEN's PhysX GPU library {physx_gpu.folder() / physx_gpu.LIBRARY}, "
            f"which is there but did not load: {type(error).__name__}: {str(error)[:300]}. Fetch it again "
            f"(`python -m rllib_gaze.envs.physx_gpu fetch`, from {physx_gpu.url()}) or use "
            "sim_backend='physx_cpu'."
        ) from error


def _check_env_id(env_id: str) -> None:
    import mani_skill.envs  # noqa: F401  (registers the tasks)
    from mani_skill.utils.registration import REGISTERED_ENVS

    if env_id not in REGISTERED_ENVS:
        close = difflib.get_close_matches(env_id, list(REGISTERED_ENVS), n=5)
        hint = f"; did you mean {close}?" if close else f"; known ids include {sorted(REGISTERED_ENVS)[:10]}"
        raise ValueError(f"env_id={env_id!r} is not a registered ManiSkill task{hint}")


def _make_one(env_id: str, num_envs: int, sim_backend: str, camera_size: int, include_state: bool,
              control_mode: str, reconfiguration_freq: int | None, max_episode_steps: int | None,
              extra: dict) -> gym.Env:
    from mani_skill.utils.wrappers.flatten import FlattenRGBDObservationWrapper

    kwargs = dict(num_envs=num_envs, obs_mode="rgb", sim_backend=sim_backend, control_mode=control_mode,
                  sensor_configs={"width": camera_size, "height": camera_size},
                  reconfiguration_freq=reconfiguration_freq, **extra)
    if sim_backend == "physx_cpu":
        kwargs["render_backend"] = "cpu"
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    try:
        env = gym.make(env_id, **kwargs)
    except RuntimeError as err:
        if any(s in str(err) for s in ("rendering device", "ErrorIncompatibleDriver", "vk::", "Vulkan")):
            raise RuntimeError(f"{VULKAN_HELP} (ManiSkill said: {err})") from err
        raise
    # A task without a sensor camera (ManiSkill's humanoid and mobile tasks) has no "sensor_data";
    # the flattening wrapper would then stop with a bare StopIteration.
    if not env.unwrapped.single_observation_space.spaces.get("sensor_data"):
        env.close()
        raise ValueError(f"env_id={env_id!r} gives no camera image in obs_mode 'rgb' (it has no sensor camera); "
                         "the gaze needs one: pick a task with a camera, e.g. PushCube-v1")
    return FlattenRGBDObservationWrapper(env, rgb=True, depth=False, state=include_state)


class CPUBatch:
    """``num_envs`` single-env CPU ManiSkill objects behind ManiSkill's batched API.

    ``reset(options={"env_idx": idx})`` resets those objects and returns every sub-env's latest
    observation; ``step(actions (N, A))`` steps each object with its row. Tensors come back
    concatenated along a leading ``num_envs`` axis.

    Every reset passes ManiSkill an explicit seed drawn from the sub-env's own generator (seeded by
    ``reset(seed=s)`` with ``s + i``): unseeded ManiSkill resets draw from torch's *global* RNG, so
    anything else that uses it (a policy, RLlib) would change which episodes the env produces.
    """

    def __init__(self, envs: list[gym.Env]):
        self.envs = envs
        self.num_envs = len(envs)
        self._seeders = [np.random.default_rng() for _ in envs]
        self.device = torch.device("cpu")
        self.single_observation_space = envs[0].unwrapped.single_observation_space
        self.single_action_space = envs[0].unwrapped.single_action_space
        self._last_obs: list[dict] = [None] * self.num_envs

    @staticmethod
    def _cat(items: list[Any]) -> Any:
        if isinstance(items[0], dict):
            return {k: torch.cat([it[k] for it in items]) for k in items[0]}
        return torch.cat([torch.as_tensor(it).reshape(-1) for it in items])

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        idx = (options or {}).get("env_idx")
        idx = range(self.num_envs) if idx is None else torch.as_tensor(idx).reshape(-1).tolist()
        for i in idx:
            if seed is not None:
                self._seeders[i] = np.random.default_rng(seed + i)
            self._last_obs[i], _ = self.envs[i].reset(seed=int(self._seeders[i].integers(2**31)))
        return self._cat(self._last_obs), {}

    def step(self, actions: torch.Tensor):
        results = [env.step(actions[i:i + 1]) for i, env in enumerate(self.envs)]
        self._last_obs = [r[0] for r in results]
        success = [r[4].get("success", torch.zeros(1, dtype=torch.bool)) for r in results]
        return (self._cat(self._last_obs), self._cat([r[1] for r in results]), self._cat([r[2] for r in results]),
                self._cat([r[3] for r in results]), {"success": self._cat(success)})

    def close(self):
        for env in self.envs:
            env.close()


def make_maniskill(num_envs: int, env_id: str = "PushCube-v1", *, sim_backend: str = "auto",
                   camera_size: int = 128, include_state: bool = True, control_mode: str = "pd_joint_delta_pos",
                   reconfiguration_freq: int | None = None, max_episode_steps: int | None = None,
                   clutter: int = 0, **extra: Any):
    """A batched ManiSkill env: GPU-batched with ``physx_cuda``, a ``CPUBatch`` with ``physx_cpu``.

    ``sim_backend="auto"`` picks ``physx_cuda`` when torch sees a GPU. ``clutter > 0`` adds that
    many visual-only distractor objects (``maniskill_clutter``). ``extra`` goes to ``gym.make``.
    """
    if sim_backend not in SIM_BACKENDS:
        raise ValueError(f"sim_backend={sim_backend!r}: allowed values are {SIM_BACKENDS}")
    if camera_size < 16:
        raise ValueError(f"camera_size={camera_size!r}: must be >= 16")
    if not isinstance(clutter, int) or clutter < 0:
        raise ValueError(f"clutter={clutter!r}: must be an integer >= 0")
    _check_env_id(env_id)
    if clutter > 0:
        from rllib_gaze.envs.maniskill_clutter import cluttered_env_id

        env_id, extra = cluttered_env_id(env_id), {**extra, "clutter": clutter}
    if sim_backend == "auto":
        sim_backend = "physx_cuda" if torch.cuda.is_available() else "physx_cpu"
    if sim_backend == "physx_cuda" and not torch.cuda.is_available():
        raise ValueError(f"sim_backend='physx_cuda' needs a CUDA GPU and torch sees none: "
                         f"{no_cuda_reason(nvidia_driver(), torch.__version__, torch.version.cuda)}")
    args = (sim_backend, camera_size, include_state, control_mode, reconfiguration_freq, max_episode_steps, extra)
    if sim_backend == "physx_cuda":
        enable_physx_gpu()
        env = _make_one(env_id, num_envs, *args)
        env.num_envs, env.device = num_envs, env.unwrapped.device
        env.single_observation_space = env.unwrapped.single_observation_space
        env.single_action_space = env.unwrapped.single_action_space
        return env
    return CPUBatch([_make_one(env_id, 1, *args) for _ in range(num_envs)])


def check_rendering(sim_backend: str = "auto", env_id: str = "PushCube-v1") -> str:
    """Builds two sub-envs of ``env_id``, renders one step and says what ran; raises with
    ``VULKAN_HELP`` when rendering cannot work here. Cluster nodes run it at set-up."""
    env = make_maniskill(2, env_id, sim_backend=sim_backend, camera_size=64)
    try:
        obs, _ = env.reset(seed=0)
        obs, *_ = env.step(torch.zeros((2, *env.single_action_space.shape), device=getattr(env, "device", "cpu")))
        rgb = obs["rgb"]
        if tuple(rgb.shape) != (2, 64, 64, 3) or not bool((rgb.float().std() > 0).item()):
            raise RuntimeError(f"ManiSkill rendered {tuple(rgb.shape)} images with no content: {VULKAN_HELP}")
    finally:
        env.close()
    gpu = torch.cuda.is_available() and sim_backend != "physx_cpu"
    backend = "physx_cuda on " + torch.cuda.get_device_name(0) if gpu else "physx_cpu"
    return f"ManiSkill renders {env_id} here with {backend}"


if __name__ == "__main__":
    import sys

    print(check_rendering(sys.argv[1] if len(sys.argv) > 1 else "auto"))
