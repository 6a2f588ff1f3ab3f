"""GazePPOModule: ppo_rgb's NatureCNN actor-critic with a gaze between encoder and heads.

Data path: obs -> NatureCNN conv stack -> pre-attention map (B, C, h, w) -> gaze -> flatten ->
Linear 256 (+ state -> Linear 256) -> 512-d features -> actor mean / critic value.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override
from torch import nn

from rllib_gaze.gaze import build_gaze, glimpse

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
    "gaze_normalization": "peak", # "peak" (max weight 1) | "mean" (mean weight 1)
    "gaze_head_init_std": 1e-3,   # foveal: std of the gaze head's output layer at init
    "gaze_centre": "mlp",         # foveal: "mlp" (tanh of the head) | "soft_argmax" (of a relevance map)
    "gaze_oracle_sigma": 0.3,     # oracle: fixed spread
    "gaze_rl_gradient": True,     # False: RL's gradient stops at the gaze weights
    "gaze_predict_coeff": 0.0,    # > 0: a return predictor on what the gaze sees (gaze_predictor)
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


# Observation key of the target's position (B, 2) in image coordinates [0, 1], where an env
# knows it (the diagnostics' ``expose_target``): read only by the oracle gaze and the learner's
# gaze-to-target metric, never by the policy or value networks.
TARGET = "target"


def _split_obs_space(space: gym.Space) -> tuple[gym.spaces.Box, gym.spaces.Box | None]:
    """(rgb space (H, W, C), state space or None) from a Box image or a Dict {rgb, state, target}."""
    if isinstance(space, gym.spaces.Dict):
        if "rgb" not in space.spaces:
            raise ValueError(f"Dict observation space needs an 'rgb' key; got keys {list(space.spaces)}")
        extra = set(space.spaces) - {"rgb", "state", TARGET}
        if extra:
            raise ValueError(f"Dict observation space: unsupported keys {sorted(extra)}; "
                             f"allowed: 'rgb', 'state', {TARGET!r}")
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

        self.attention = cfg["attention"]
        if self.attention == "oracle" and not (isinstance(self.observation_space, gym.spaces.Dict)
                                               and TARGET in self.observation_space.spaces):
            raise ValueError(f"attention='oracle' needs the target's position in the observation "
                             f"(a Dict with a {TARGET!r} key, e.g. the clutter env's expose_target=True); "
                             f"got {self.observation_space}")
        self.gaze = build_gaze(self.attention, fc, fh, fw, floor=cfg["gaze_floor"],
                               sigma_min=cfg["gaze_sigma_min"], init_sigma=cfg["gaze_init_sigma"],
                               rho_max=cfg["gaze_rho_max"], normalization=cfg["gaze_normalization"],
                               head_init_std=cfg["gaze_head_init_std"], centre=cfg["gaze_centre"],
                               oracle_sigma=cfg["gaze_oracle_sigma"])
        self._gaze_rl_gradient = bool(cfg["gaze_rl_gradient"])
        self.image_fc = nn.Sequential(nn.Linear(fc * fh * fw, cfg["image_feature_dim"]), nn.ReLU())
        feature_dim = cfg["image_feature_dim"]
        self.state_fc = None
        if state_space is not None:
            self.state_fc = nn.Linear(state_space.shape[0], cfg["state_feature_dim"])
            feature_dim += cfg["state_feature_dim"]

        # Ours, not the paper's (the "gaze-predict" arm): a small head that predicts the return from
        # where the gaze is and what it sees, plus the state; the learner trains it and the gaze.
        self.gaze_predictor = None
        if self.gaze is not None and cfg["gaze_predict_coeff"] > 0:
            state_dim = state_space.shape[0] if state_space is not None else 0
            self.gaze_predictor = nn.Sequential(nn.Linear(fc + 2 + state_dim, 64), nn.ReLU(), nn.Linear(64, 1))

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

    def gaze_weights(self, features: torch.Tensor, obs: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention of feature maps ``(B, C, h, w)``: weights ``(B, h, w)`` and the gaze's
        parameters (``(B, 5)`` foveal and oracle, ``(B, h, w)`` patch). The oracle also needs the
        observations ``obs`` (their ``"target"``). Only for modules with attention."""
        if self.gaze is None:
            raise ValueError("this module has attention='none': it has no gaze")
        if self.attention == "oracle":
            return self.gaze.attention_map(features, obs[TARGET])
        return self.gaze.attention_map(features)

    def predict_return(self, features: torch.Tensor, obs: Any) -> torch.Tensor:
        """``(B,)`` return predicted from the gaze on detached feature maps ``(B, C, h, w)``: the
        gaze-weighted mean channel vector (what the fovea sees), the centre (where it looks) and
        the state. Its gradient reaches the gaze and the predictor only."""
        weights, params = self.gaze_weights(features, obs)
        inputs = [glimpse(features, weights), params[:, :2]]
        if isinstance(obs, dict) and "state" in obs:
            inputs.append(obs["state"].float())
        return self.gaze_predictor(torch.cat(inputs, dim=-1)).squeeze(-1)

    def encode(self, obs: Any) -> dict[str, torch.Tensor]:
        """obs -> ``{"features": (B, F), "pre_attention_features": (B, C, h, w), "gaze_params": ...}``."""
        pre = self.image_features(obs["rgb"] if isinstance(obs, dict) else obs)
        out = {PRE_ATTENTION_FEATURES: pre}
        attended = pre
        if self.gaze is not None:
            weights, out[GAZE_PARAMS] = self.gaze_weights(pre, obs)
            if not self._gaze_rl_gradient:
                weights = weights.detach()  # only the contrastive loss trains the gaze
            attended = pre * weights.unsqueeze(1)
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
        return ["vf", "gaze_predictor"] if self.gaze_predictor is not None else ["vf"]
