"""GazePPOModule: ppo_rgb's NatureCNN actor-critic with a gaze between encoder and heads.

Data path: obs -> NatureCNN conv stack -> pre-attention map (B, C, h, w) -> gaze -> flatten ->
Linear 256 (+ state -> Linear 256) -> 512-d features -> actor mean / critic value.

Outside this module (learner, drawings, benchmarks) the gaze is reached only through ``GazeAPI``.
"""

from __future__ import annotations

import abc

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override
from torch import nn

from rllib_gaze.gaze import GAZE_DEFAULTS, MapRegistration, build_gaze, glimpse

# Keys this module adds to its forward_train output (read by GazePPOLearner).
PRE_ATTENTION_FEATURES = "pre_attention_features"
GAZE_PARAMS = "gaze_params"

# ManiSkill ppo_rgb's NatureCNN: (out_channels, kernel, stride) per conv.
NATURE_CNN_FILTERS = ((32, 8, 4), (64, 4, 2), (64, 3, 1))

# The gaze's settings (rllib_gaze.gaze.GAZE_DEFAULTS), then the network's shape.
DEFAULT_MODEL_CONFIG = {
    **GAZE_DEFAULTS,
    "conv_filters": NATURE_CNN_FILTERS,
    "image_feature_dim": 256,
    "state_feature_dim": 256,
    "head_hidden": 512,
    "init_log_std": -0.5,
    # Emit the critic's value with every action (Columns.VF_PREDS) and keep the critic on the env
    # runners: what GazePPOConfig's .training(values_from_sampling=...) sets (rllib_gaze.gae).
    "values_from_sampling": False,
}


def _layer_init(layer: nn.Module, std: float = np.sqrt(2), bias: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


# An observation batch: images (B, H, W, C), or a dict with "rgb" (B, H, W, C) and optionally
# "state" (B, S) and TARGET (B, 2).
Observations = torch.Tensor | dict[str, torch.Tensor]

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


class GazeAPI(abc.ABC):
    """An RLModule with a gaze on a CNN feature map, as the learner and the drawings use it (in the
    spirit of RLlib's ``ValueFunctionAPI``).

    Besides the methods below, ``feature_map_shape`` is the ``(C, h, w)`` of the map the gaze acts on,
    and ``map_registration`` (``rllib_gaze.gaze.MapRegistration``) where image points fall on it.
    """

    feature_map_shape: tuple[int, int, int]
    map_registration: MapRegistration

    @property
    @abc.abstractmethod
    def attention_kind(self) -> str:
        """``"foveal"``, ``"patch"``, ``"oracle"``, ``"centre"`` or ``"none"``. The gaze's parameters are
        ``(B, 5)`` Gaussians (``rllib_gaze.gaze.GAZE_PARAM_NAMES``) for ``GAUSSIAN_MODES``, ``(B, h, w)``
        weights for patch."""

    @abc.abstractmethod
    def feature_map(self, obs: Observations) -> torch.Tensor:
        """The feature map ``(B, C, h, w)`` the gaze acts on, of observations (images ``(B, H, W, C)``
        or a dict with ``"rgb"``), before attention."""

    @abc.abstractmethod
    def gaze_weights(self, features: torch.Tensor,
                     obs: Observations | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The gaze on feature maps ``(B, C, h, w)``: weights ``(B, h, w)`` and parameters (shape by
        ``attention_kind``). The oracle also reads ``obs`` (its ``"target"``). Raises
        ``ValueError`` for ``attention_kind == "none"``."""

    @abc.abstractmethod
    def gaze_parameters(self) -> list[nn.Parameter]:
        """The gaze's own trainable parameters (none without a learnt gaze): what a separate gaze
        optimizer steps and what gaze gradient norms are measured on."""


class GazeModuleMixin(GazeAPI):
    """``GazeAPI`` for a torch RLModule whose gaze acts on one conv map of its image encoder: shared
    by ``GazePPOModule`` and ``GazeSACModule``.

    In ``setup`` the module sets ``self._scale_image`` (uint8 images) and calls ``_build_gaze``; its
    ``feature_map`` runs its convs on ``_images(obs)``, and its encoder applies ``_attend``.
    """

    def _build_gaze(self, cfg: dict, map_shape: tuple[int, int, int], encoder: nn.Module,
                    image_hw: tuple[int, int]) -> None:
        """Build the gaze that ``cfg`` (a model_config) asks for over maps ``(C, h, w)``, which the layers
        of ``encoder`` make from images ``image_hw``; raises ``ValueError`` naming what is wrong
        (``build_gaze``, or an oracle without the target)."""
        self.feature_map_shape = tuple(map_shape)
        self.map_registration = MapRegistration.of_layers(encoder, image_hw, map_shape[1:])
        self._attention_kind = cfg["attention"]
        if self._attention_kind == "oracle" and not (isinstance(self.observation_space, gym.spaces.Dict)
                                                     and TARGET in self.observation_space.spaces):
            raise ValueError(f"attention='oracle' needs the target's position in the observation "
                             f"(a Dict with a {TARGET!r} key, e.g. the clutter env's expose_target=True); "
                             f"got {self.observation_space}")
        self.gaze = build_gaze(cfg, *map_shape, registration=self.map_registration)
        self._gaze_rl_gradient = cfg["gaze_rl_gradient"] is not False  # None: see GAZE_DEFAULTS
        if cfg["gaze_input"] == "centred":
            # (C, h, w): the learner writes its memory's mean map here; a buffer, so it travels with
            # the weights to the env runners and into checkpoints
            self.register_buffer("gaze_input_centre", torch.zeros(map_shape))

    def _images(self, obs: Observations) -> torch.Tensor:
        """Images ``(B, C, H, W)`` as floats (uint8 scaled by 1/255) from observations."""
        rgb = obs["rgb"] if isinstance(obs, dict) else obs
        x = rgb.permute(0, 3, 1, 2).float()
        return x / 255.0 if self._scale_image else x

    def _attend(self, pre: torch.Tensor, obs: Observations, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The map ``pre (B, C, h, w)`` under the gaze (itself without one); the gaze's parameters go
        to ``out[GAZE_PARAMS]``."""
        if self.gaze is None:
            return pre
        weights, out[GAZE_PARAMS] = self.gaze_weights(pre, obs)
        if not self._gaze_rl_gradient:
            weights = weights.detach()  # only the gaze's own objective trains it
        return pre * weights.unsqueeze(1)

    @property
    @override(GazeAPI)
    def attention_kind(self) -> str:
        return self._attention_kind

    @override(GazeAPI)
    def gaze_weights(self, features: torch.Tensor,
                     obs: Observations | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gaze is None:
            raise ValueError("this module has attention='none': it has no gaze")
        if self._attention_kind == "oracle":
            return self.gaze.attention_map(features, obs[TARGET])
        if self._attention_kind == "centre":
            return self.gaze.attention_map(features)
        centre = getattr(self, "gaze_input_centre", None)
        # the head reads the centred map (gaze_input="centred"); the weights still apply to the raw one
        return self.gaze.attention_map(features if centre is None else features - centre)

    @override(GazeAPI)
    def gaze_parameters(self) -> list[nn.Parameter]:
        return [] if self.gaze is None else list(self.gaze.parameters())


class GazePPOModule(TorchRLModule, ValueFunctionAPI, InferenceOnlyAPI, GazeModuleMixin):
    """PPO actor-critic for pixel observations with optional foveal/patch/oracle attention.

    Observations: Box ``(H, W, C)`` (uint8 is scaled by 1/255) or Dict ``{"rgb": (H, W, C),
    "state": (S,)}`` (optionally with ``"target": (2,)``, read only by the oracle). Actions: Box
    ``(A,)``; the policy is a diagonal Gaussian with a free, state-independent log-std (as in ppo_rgb).

    ``forward_train`` adds ``pre_attention_features (B, C, h, w)`` and, with attention,
    ``gaze_params`` (``(B, 5)`` foveal and oracle, ``(B, h, w)`` patch) for the learner's losses.
    With model_config ``values_from_sampling`` the exploration and inference passes also return the
    critic's value ``vf_preds (B,)`` (as ppo_rgb's sampling pass does; ``rllib_gaze.gae`` reads it), and
    the critic stays in the env runners' inference-only copies.

    The learner, the drawings and the benchmarks use its ``GazeAPI`` (and ``predict_return``,
    the ``gaze-predict`` head), not its attributes.
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
        self._build_gaze(cfg, (fc, fh, fw), self.cnn, (height, width))
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
        self._values_from_sampling = bool(cfg["values_from_sampling"])

    @override(GazeAPI)
    def feature_map(self, obs: Observations) -> torch.Tensor:
        return self.cnn(self._images(obs))

    def predict_return(self, features: torch.Tensor, obs: Observations) -> torch.Tensor:
        """``(B,)`` return predicted from the gaze on detached feature maps ``(B, C, h, w)``: the
        gaze-weighted mean channel vector (what the fovea sees), the centre (where it looks) and
        the state. Its gradient reaches the gaze and the predictor only."""
        weights, params = self.gaze_weights(features, obs)
        inputs = [glimpse(features, weights), params[:, :2]]
        if isinstance(obs, dict) and "state" in obs:
            inputs.append(obs["state"].float())
        return self.gaze_predictor(torch.cat(inputs, dim=-1)).squeeze(-1)

    def encode(self, obs: Observations) -> dict[str, torch.Tensor]:
        """obs -> ``{"features": (B, F), "pre_attention_features": (B, C, h, w), "gaze_params": ...}``."""
        pre = self.feature_map(obs)
        out = {PRE_ATTENTION_FEATURES: pre}
        features = self.image_fc(self._attend(pre, obs, out).flatten(1))
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
        out = {Columns.ACTION_DIST_INPUTS: self._action_dist_inputs(features)}
        if self._values_from_sampling:
            out[Columns.VF_PREDS] = self.vf(features).squeeze(-1)
        return out

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
        # RLlib deletes these from the env runners' copies (and leaves them out of the weight sync)
        learner_only = [] if self._values_from_sampling else ["vf"]
        return learner_only + (["gaze_predictor"] if self.gaze_predictor is not None else [])
