"""GazeSACModule: ManiSkill sac_rgbd's PlainConv actor and twin critics for RLlib's SAC, with a gaze
on a conv map of the shared encoder.

Data path (128 px, sac_rgbd's shapes; docs/method.md, "GazeSAC"):

    rgb (B, 128, 128, 3) -> conv16 -> pool4 -> conv32 -> pool2 -> conv64 -> pool2 -> conv64
        -> pre-attention map (B, 64, 8, 8) -> gaze -> pool2 -> 1x1 conv64 -> (B, 64, 4, 4)
        -> flatten -> Linear 256 + ReLU                            visual features (B, 256)
    actor:  [visual.detach(), state] -> 512 -> 256 -> mean, log-std (tanh to [-5, 2])
    critic: [visual, state, action] -> 512 -> 256 -> 1, twice; target copies of the two heads

One encoder serves actor and critics: the critic loss trains it, the actor reads its features
detached, and the target critics read the live encoder's features of the next observation (as
sac_rgbd, whose target Q networks share the encoder).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.sac.sac_learner import ACTION_DIST_INPUTS_NEXT, QF_PREDS, QF_TWIN_PREDS
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDeterministic, TorchSquashedGaussian
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, QNetAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import NetworkType
from torch import nn

from rllib_gaze.gaze import GAZE_DEFAULTS
from rllib_gaze.module import (
    GAZE_PARAMS,
    PRE_ATTENTION_FEATURES,
    GazeAPI,
    GazeModuleMixin,
    Observations,
    _split_obs_space,
)

# Which conv map the gaze acts on. "pre_pool": the last 3x3 conv's output before the last pooling
# (8x8 at 128 px); "last": the encoder's final 1x1-conv map (4x4 at 128 px).
GAZE_MAPS = ("pre_pool", "last")

# The module's settings: the gaze's (rllib_gaze.gaze.GAZE_DEFAULTS), then sac_rgbd's network.
DEFAULT_SAC_MODEL_CONFIG: dict[str, Any] = {
    **GAZE_DEFAULTS,
    "gaze_map": "pre_pool",
    "image_feature_dim": 256,
    "actor_hidden": (512, 256),
    "q_hidden": (512, 256),
    "twin_q": True,
}

# sac_rgbd's bounds of the actor's log-std, reached through a tanh (SpinUp / Yarats).
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def _mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int | None = None) -> nn.Sequential:
    """sac_rgbd's ``make_mlp``: Linear + ReLU per hidden size, then an optional linear output."""
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(in_dim, size), nn.ReLU()]
        in_dim = size
    if out_dim is not None:
        layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class SquashedGaussian(TorchSquashedGaussian):
    """RLlib's tanh-squashed Gaussian whose deterministic action is the squashed mean, as
    sac_rgbd's ``get_eval_action`` (RLlib's returns the mean *before* the tanh)."""

    @override(TorchSquashedGaussian)
    def to_deterministic(self) -> TorchDeterministic:
        return TorchDeterministic(loc=self._squash(self.loc))


class PlainConv(nn.Module):
    """sac_rgbd's ``PlainConv`` (without its FC), split where the gaze acts.

    ``head``: images ``(B, C, H, W)`` -> the map the gaze acts on; ``tail``: that map -> the last
    map ``(B, 64, h, w)`` (4x4 at 128 px). Biases start at zero, as in sac_rgbd.
    """

    def __init__(self, in_channels: int, gaze_map: str):
        super().__init__()
        layers = [
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4, 4),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2, 2), nn.Conv2d(64, 64, 1), nn.ReLU(),
        ]
        split = 11 if gaze_map == "pre_pool" else len(layers)
        self.head, self.tail = nn.Sequential(*layers[:split]), nn.Sequential(*layers[split:])
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                nn.init.zeros_(layer.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(images))


class GazeSACModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI, QNetAPI, GazeModuleMixin):
    """SAC for pixels (+ state) in the shape of ManiSkill's ``sac_rgbd.py``, with an optional gaze.

    Observations: Box ``(H, W, C)`` (uint8 scaled by 1/255) or Dict ``{"rgb": (H, W, C),
    "state": (S,)}`` (optionally ``"target": (2,)``, read only by the oracle). Actions: Box ``(A,)``;
    the policy is a tanh-squashed Gaussian with a state-dependent log-std in ``[-5, 2]``.

    Implements RLlib's SAC module APIs as ``DefaultSACTorchRLModule`` does (``forward_train`` fills
    ``qf_preds``, ``qf_twin_preds``, ``logp_resampled``, ``q_curr``, ``q_target_next``,
    ``logp_next_resampled`` for ``SACTorchLearner``'s loss; ``TargetNetworkAPI``, ``QNetAPI``), plus
    ``GazeAPI``: ``forward_train`` also returns ``pre_attention_features (B, C, h, w)`` and, with
    attention, ``gaze_params`` (``(B, 5)`` foveal/oracle, ``(B, h, w)`` patch) and the visual
    features ``embeddings (B, F)``.

    Parameter groups, as ``GazeSACLearner`` optimises them: ``encoder_parameters()`` (conv + FC,
    the critic loss trains them), ``qf``/``qf_twin`` (critic heads), ``pi`` (actor),
    ``gaze_parameters()``; ``actor_parameters()`` lists ``pi``'s.
    """

    @override(TorchRLModule)
    def setup(self):
        cfg = {**DEFAULT_SAC_MODEL_CONFIG, **(self.model_config or {})}
        if cfg["gaze_map"] not in GAZE_MAPS:
            raise ValueError(f"gaze_map={cfg['gaze_map']!r} is not known; allowed values are {GAZE_MAPS}")
        rgb_space, state_space = _split_obs_space(self.observation_space)
        if not isinstance(self.action_space, gym.spaces.Box) or len(self.action_space.shape) != 1:
            raise ValueError(f"GazeSACModule needs a 1-D Box action space; got {self.action_space}")
        self._scale_image = rgb_space.dtype == np.uint8
        height, width, channels = rgb_space.shape
        self.twin_q = bool(cfg["twin_q"])

        self.cnn = PlainConv(channels, cfg["gaze_map"])
        with torch.no_grad():
            pre = self.cnn.head(torch.zeros(1, channels, height, width))
            last = self.cnn.tail(pre)
        self._build_gaze(cfg, tuple(pre.shape[1:]), self.cnn.head, (height, width))
        self.image_fc = nn.Sequential(nn.Linear(last[0].numel(), cfg["image_feature_dim"]), nn.ReLU())

        self._state_dim = state_space.shape[0] if state_space is not None else 0
        act_dim = self.action_space.shape[0]
        actor_in = cfg["image_feature_dim"] + self._state_dim
        self.pi = _mlp(actor_in, tuple(cfg["actor_hidden"]))
        self.pi_mean = nn.Linear(cfg["actor_hidden"][-1], act_dim)
        self.pi_log_std = nn.Linear(cfg["actor_hidden"][-1], act_dim)
        if not self.inference_only:
            self.qf = _mlp(actor_in + act_dim, tuple(cfg["q_hidden"]), 1)
            self.qf_twin = _mlp(actor_in + act_dim, tuple(cfg["q_hidden"]), 1) if self.twin_q else None

    # --- GazeAPI (GazeModuleMixin) ------------------------------------------------------------

    @override(GazeAPI)
    def feature_map(self, obs: Observations) -> torch.Tensor:
        return self.cnn.head(self._images(obs))

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The shared encoder's parameters (conv stack and FC, not the gaze): the critic's."""
        return list(self.cnn.parameters()) + list(self.image_fc.parameters())

    def actor_parameters(self) -> list[nn.Parameter]:
        """The actor's parameters (its MLP and the mean and log-std layers)."""
        return [*self.pi.parameters(), *self.pi_mean.parameters(), *self.pi_log_std.parameters()]

    def encode(self, obs: Observations) -> dict[str, torch.Tensor]:
        """obs -> ``{"features": (B, F), "pre_attention_features": (B, C, h, w), "gaze_params": ...}``."""
        pre = self.feature_map(obs)
        out = {PRE_ATTENTION_FEATURES: pre}
        out["features"] = self.image_fc(self.cnn.tail(self._attend(pre, obs, out)).flatten(1))
        return out

    # --- heads ---------------------------------------------------------------------------------

    def _with_state(self, features: torch.Tensor, obs: Observations, *extra: torch.Tensor) -> torch.Tensor:
        parts = [features]
        if self._state_dim:
            parts.append(obs["state"].float())
        return torch.cat([*parts, *extra], dim=-1)

    def _action_dist_inputs(self, features: torch.Tensor, obs: Observations) -> torch.Tensor:
        """``(B, 2A)``: mean and log-std (tanh-rescaled to ``[LOG_STD_MIN, LOG_STD_MAX]``)."""
        hidden = self.pi(self._with_state(features, obs))
        log_std = torch.tanh(self.pi_log_std(hidden))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1.0)
        return torch.cat([self.pi_mean(hidden), log_std], dim=-1)

    def _q(self, heads: list[nn.Module], features: torch.Tensor, obs: Observations,
           actions: torch.Tensor) -> torch.Tensor:
        """``(B,)``: the minimum over ``heads`` of Q(features, state, action)."""
        x = self._with_state(features, obs, actions.float())
        return torch.stack([head(x).squeeze(-1) for head in heads]).min(0).values

    def _q_heads(self) -> list[nn.Module]:
        return [self.qf, self.qf_twin] if self.twin_q else [self.qf]

    def _target_heads(self) -> list[nn.Module]:
        return [self.target_qf, self.target_qf_twin] if self.twin_q else [self.target_qf]

    # --- RLModule forward passes ---------------------------------------------------------------

    def get_train_action_dist_cls(self) -> type[SquashedGaussian]:
        return SquashedGaussian

    def get_exploration_action_dist_cls(self) -> type[SquashedGaussian]:
        return SquashedGaussian

    def get_inference_action_dist_cls(self) -> type[SquashedGaussian]:
        return SquashedGaussian

    @override(TorchRLModule)
    def _forward(self, batch: dict, **kwargs) -> dict:
        obs = batch[Columns.OBS]
        return {Columns.ACTION_DIST_INPUTS: self._action_dist_inputs(self.encode(obs)["features"], obs)}

    @override(TorchRLModule)
    def _forward_train(self, batch: dict, **kwargs) -> dict:
        obs, next_obs = batch[Columns.OBS], batch[Columns.NEXT_OBS]
        enc = self.encode(obs)
        features = enc["features"]  # the critic loss trains the encoder through these
        out = {Columns.EMBEDDINGS: features, PRE_ATTENTION_FEATURES: enc[PRE_ATTENTION_FEATURES]}
        if GAZE_PARAMS in enc:
            out[GAZE_PARAMS] = enc[GAZE_PARAMS]
        x = self._with_state(features, obs, batch[Columns.ACTIONS].float())
        out[QF_PREDS] = self.qf(x).squeeze(-1)
        if self.twin_q:
            out[QF_TWIN_PREDS] = self.qf_twin(x).squeeze(-1)

        # The actor sees the encoder's features detached: only the critic shapes the encoder.
        actor_features = features.detach()
        logits = self._action_dist_inputs(actor_features, obs)
        out[Columns.ACTION_DIST_INPUTS] = logits
        actions, out["logp_resampled"] = SquashedGaussian.from_logits(logits).rsample_and_logp()
        # Q of the resampled actions: the gradient must reach the actor through the actions but
        # not the critic heads (whose gradients the learner collects from the critic loss alone).
        heads = self._q_heads()
        for p in (p for head in heads for p in head.parameters()):
            p.requires_grad_(False)
        out["q_curr"] = self._q(heads, actor_features, obs, actions)
        for p in (p for head in heads for p in head.parameters()):
            p.requires_grad_(True)

        with torch.no_grad():
            next_features = self.encode(next_obs)["features"]
            logits_next = self._action_dist_inputs(next_features, next_obs)
            actions_next, logp_next = SquashedGaussian.from_logits(logits_next).sample_and_logp()
            out[ACTION_DIST_INPUTS_NEXT] = logits_next
            out["logp_next_resampled"] = logp_next
            out["q_target_next"] = self._q(self._target_heads(), next_features, next_obs, actions_next)
        return out

    # --- RLlib's SAC APIs ----------------------------------------------------------------------

    @override(TargetNetworkAPI)
    def make_target_networks(self) -> None:
        # Heads only: as in sac_rgbd, the targets read the live encoder's features.
        self.target_qf = make_target_network(self.qf)
        self.target_qf_twin = make_target_network(self.qf_twin) if self.twin_q else None

    @override(TargetNetworkAPI)
    def get_target_network_pairs(self) -> list[tuple[NetworkType, NetworkType]]:
        pairs = [(self.qf, self.target_qf)]
        if self.twin_q:
            pairs.append((self.qf_twin, self.target_qf_twin))
        return pairs

    @override(TargetNetworkAPI)
    def forward_target(self, batch: dict[str, Any], **kwargs) -> torch.Tensor:
        """``(B,)`` min over the target heads of Q(obs, action), ``batch`` with OBS and ACTIONS."""
        obs = batch[Columns.OBS]
        with torch.no_grad():
            return self._q(self._target_heads(), self.encode(obs)["features"], obs, batch[Columns.ACTIONS])

    @override(QNetAPI)
    def compute_q_values(self, batch: dict[str, Any], **kwargs) -> torch.Tensor:
        """``(B,)`` min over the twin critics of Q(obs, action), ``batch`` with OBS and ACTIONS."""
        obs = batch[Columns.OBS]
        return self._q(self._q_heads(), self.encode(obs)["features"], obs, batch[Columns.ACTIONS])

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return ["qf", "qf_twin", "target_qf", "target_qf_twin"] if self.twin_q else ["qf", "target_qf"]

    @override(TorchRLModule)
    def get_initial_state(self) -> dict:
        return {}
