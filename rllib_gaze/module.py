"""GazePPOModule: ppo_rgb's NatureCNN actor-critic with a gaze between encoder and heads.

Data path: obs -> NatureCNN conv stack -> pre-attention map (B, C, h, w) -> gaze -> flatten ->
Linear 256 (+ state -> Linear 256) -> 512-d features -> actor mean / critic value.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override

from rllib_gaze.gaze import build_gaze

# Keys this module adds to its forward_train output (read by GazePPOLearner).
PRE_ATTENTION_FEATURES = "pre_attention_features"
GAZE_PARAMS = "gaze_params"

# ManiSkill ppo_rgb's NatureCNN: (out_channels, kernel, stride) per conv.
NATURE_CNN_FILTERS = ((32, 8, 4), (64, 4, 2), (64, 3, 1))

DEFAULT_MODEL_CONFIG = {
    "attention": "foveal",        # "foveal" | "patch" | "none"
    "gaze_floor": 0.0,            # minimum weight of any cell
    "gaze_sigma_min": 0.05,       # foveal: smallest sigma (normalised units)
    "gaze_init_sigma": 1.0,       # foveal: starting spread, centred
    "gaze_rho_max": 0.9,          # foveal: |correlation| bound
    "conv_filters": NATURE_CNN_FILTERS,
    "image_feature_dim": 256,
    "state_feature_dim": 256,
    "head_hidden": 512,
    "init_log_std": -0.5,
}


def _layer_init(layer: nn.Module, std: float = np.sqrt(2), bias: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def _split_obs_space(space: gym.Space) -> tuple[gym.spaces.Box, gym.spaces.Box | None]:
    """(rgb space (H, W, C), state space or None) from a Box image or a Dict {rgb, state}."""
    if isinstance(space, gym.spaces.Dict):
        if "rgb" not in space.spaces:
            raise ValueError(f"Dict observation space needs an 'rgb' key; got keys {list(space.spaces)}")
        extra = set(space.spaces) - {"rgb", "state"}
        if extra:
            raise ValueError(f"Dict observation space: unsupported keys {sorted(extra)}; allowed: 'rgb', 'state'")
        rgb, state = space["rgb"], space.spaces.get("state")
    else:
        rgb, state = space, None
    if not isinstance(rgb, gym.spaces.Box) or len(rgb.shape) != 3:
        raise ValueError(f"image observations must be a Box of shape (H, W, C); got {rgb}")
    if state is not None and (not isinstance(state, gym.spaces.Box) or len(state.shape) != 1):
        raise ValueError(f"'state' observations must be a 1-D Box; got {state}")
    return rgb, state


class GazePPOModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI):
    """PPO actor-critic for pixel observations with optional foveal/patch attention.

    Observations: Box ``(H, W, C)`` (uint8 is scaled by 1/255) or Dict ``{"rgb": (H, W, C),
    "state": (S,)}``. Actions: Box ``(A,)``; the policy is a diagonal Gaussian with a free,
    state-independent log-std (as in ppo_rgb).

    ``forward_train`` adds ``pre_attention_features (B, C, h, w)`` and, with attention,
    ``gaze_params`` (``(B, 5)`` foveal, ``(B, h, w)`` patch) for the learner's contrastive loss.
    """

    @override(TorchRLModule)
    def setup(self):
        cfg = {**DEFAULT_MODEL_CONFIG, **(self.model_config or {})}
        rgb_space, state_space = _split_obs_space(self.observation_space)
        if not isinstance(self.action_space, gym.spaces.Box) or len(self.action_space.shape) != 1:
            raise ValueError(f"GazePPOModule needs a 1-D Box action space; got {self.action_space}")
        self._scale_image = rgb_space.dtype == np.uint8
        height, width, channels = rgb_space.shape

        layers, in_ch = [], channels
        for out_ch, kernel, stride in cfg["conv_filters"]:
            layers += [nn.Conv2d(in_ch, out_ch, kernel, stride), nn.ReLU()]
            in_ch = out_ch
        self.cnn = nn.Sequential(*layers)
        with torch.no_grad():
            _, fc, fh, fw = self.cnn(torch.zeros(1, channels, height, width)).shape
        self.feature_map_shape = (fc, fh, fw)

        self.gaze = build_gaze(cfg["attention"], fc, fh, fw, floor=cfg["gaze_floor"],
                               sigma_min=cfg["gaze_sigma_min"], init_sigma=cfg["gaze_init_sigma"],
                               rho_max=cfg["gaze_rho_max"])
        self.image_fc = nn.Sequential(nn.Linear(fc * fh * fw, cfg["image_feature_dim"]), nn.ReLU())
        feature_dim = cfg["image_feature_dim"]
        self.state_fc = None
        if state_space is not None:
            self.state_fc = nn.Linear(state_space.shape[0], cfg["state_feature_dim"])
            feature_dim += cfg["state_feature_dim"]

        act_dim = self.action_space.shape[0]
        hidden = cfg["head_hidden"]
        self.pi = nn.Sequential(
            _layer_init(nn.Linear(feature_dim, hidden)), nn.ReLU(),
            _layer_init(nn.Linear(hidden, act_dim), std=0.01 * np.sqrt(2)),
        )
        self.log_std = nn.Parameter(torch.full((act_dim,), float(cfg["init_log_std"])))
        self.vf = nn.Sequential(
            _layer_init(nn.Linear(feature_dim, hidden)), nn.ReLU(),
            _layer_init(nn.Linear(hidden, 1)),
        )

    def image_features(self, rgb: torch.Tensor) -> torch.Tensor:
        """Images ``(B, H, W, 3)`` -> the CNN's feature map ``(B, C, h, w)`` the gaze acts on."""
        x = rgb.permute(0, 3, 1, 2).float()
        if self._scale_image:
            x = x / 255.0
        return self.cnn(x)

    def encode(self, obs: Any) -> dict[str, torch.Tensor]:
        """obs -> ``{"features": (B, F), "pre_attention_features": (B, C, h, w), "gaze_params": ...}``."""
        pre = self.image_features(obs["rgb"] if isinstance(obs, dict) else obs)
        out = {PRE_ATTENTION_FEATURES: pre}
        attended = pre
        if self.gaze is not None:
            attended, out[GAZE_PARAMS] = self.gaze(pre)
        features = self.image_fc(attended.flatten(1))
        if self.state_fc is not None:
            features = torch.cat([features, self.state_fc(obs["state"].float())], dim=-1)
        out["features"] = features
        return out

    def _action_dist_inputs(self, features: torch.Tensor) -> torch.Tensor:
        mean = self.pi(features)
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=-1)

    @override(TorchRLModule)
    def _forward(self, batch: dict, **kwargs) -> dict:
        features = self.encode(batch[Columns.OBS])["features"]
        return {Columns.ACTION_DIST_INPUTS: self._action_dist_inputs(features)}

    @override(TorchRLModule)
    def _forward_train(self, batch: dict, **kwargs) -> dict:
        enc = self.encode(batch[Columns.OBS])
        out = {
            Columns.ACTION_DIST_INPUTS: self._action_dist_inputs(enc["features"]),
            Columns.EMBEDDINGS: enc["features"],
            PRE_ATTENTION_FEATURES: enc[PRE_ATTENTION_FEATURES],
        }
        if GAZE_PARAMS in enc:
            out[GAZE_PARAMS] = enc[GAZE_PARAMS]
        return out

    @override(ValueFunctionAPI)
    def compute_values(self, batch: dict, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` values. Without ``embeddings`` (RLlib's GAE connector over the whole train
        batch) the encoder runs under no_grad: no graph over thousands of images is kept."""
        if embeddings is None:
            with torch.no_grad():
                return self.vf(self.encode(batch[Columns.OBS])["features"]).squeeze(-1)
        return self.vf(embeddings).squeeze(-1)

    @override(InferenceOnlyAPI)
    def get_non_inference_attributes(self) -> list[str]:
        return ["vf"]
