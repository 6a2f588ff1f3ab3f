"""One finiteness check per gradient step, on the norms the gradient clip computes (issue 29).

RLlib's ``TorchLearner.apply_gradients`` checks every gradient tensor with ``torch.isfinite(grad).all()``,
twice per step (once to zero a NaN/inf gradient, once more before each optimizer's step): two host
reads per parameter tensor per minibatch on a GPU, and ~4 ms per minibatch on a CPU at the
benchmark's sizes. ``torch_skip_nan_gradients=True`` turns those checks off, but then, in RLlib 2.60,
nothing checks and a NaN gradient is applied as it is; and RLlib's global-norm clip cannot tell
either (``compute_global_norm`` maps a NaN norm to 0). ppo_rgb checks nothing.

``FiniteGradientsMixin`` (before an RLlib torch learner in the bases, with ``torch_skip_nan_gradients=True``)
clips by the global norm with RLlib's arithmetic but keeps each gradient tensor's norm as it is, and
before the optimizers step reads one bool: are all those norms finite. If so the step goes on as
RLlib's; if not, the whole step is skipped (no optimizer moves, Adam's moments untouched: what RLlib
documents for ``torch_skip_nan_gradients=True``), a warning names the gradients, and
``NONFINITE_GRADIENT_STEPS_KEY`` counts it. A clip other than by global norm, or none, has its norms
measured here once per step. Under mixed precision (RLlib's grad scalers) the scalers decide, as in
RLlib.
"""

from __future__ import annotations

import logging

import torch
from ray.rllib.core import ALL_MODULES
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.torch_utils import clip_gradients
from ray.rllib.utils.typing import ParamDict

from rllib_gaze.results import NONFINITE_GRADIENT_STEPS_KEY

logger = logging.getLogger("ray.rllib")


class FiniteGradientsMixin:
    """Skips a gradient step whose gradients hold a NaN or an inf, after one check per step (module
    docstring). For a ``TorchLearner`` whose config sets ``torch_skip_nan_gradients=True``."""

    @override(TorchLearner)
    def postprocess_gradients(self, gradients_dict: ParamDict) -> ParamDict:
        self._gradient_norms: list[torch.Tensor] = []   # (P,) per clipped optimizer, filled by _clip
        return super().postprocess_gradients(gradients_dict)

    @override(TorchLearner)
    def _get_clip_function(self):
        # RLlib's is a static method returning torch_utils.clip_gradients; this one keeps the norms
        return self._clip

    def _clip(self, gradients_dict: ParamDict, *, grad_clip: float | None = None, grad_clip_by: str = "value"):
        """RLlib's ``clip_gradients``; by global norm its arithmetic, the gradient tensors' norms ``(P,)``
        kept for the finiteness check before they are made finite for the clip coefficient."""
        if grad_clip is None or grad_clip_by != "global_norm":
            return clip_gradients(gradients_dict, grad_clip=grad_clip, grad_clip_by=grad_clip_by)
        grads = [g for g in gradients_dict.values() if g is not None]
        if not grads:
            return torch.tensor(0.0)
        norms = torch.stack([torch.norm(g.detach(), 2.0) for g in grads])
        self._gradient_norms.append(norms)
        # RLlib's compute_global_norm and clip coefficient, unchanged
        total = torch.norm(norms.nan_to_num(neginf=-10e8, posinf=10e8), 2.0).nan_to_num(neginf=-10e8, posinf=10e8)
        coeff = torch.clamp(grad_clip / torch.clamp(total + 1e-6, min=grad_clip), max=1.0)
        for g in grads:
            g.detach().mul_(coeff.to(g.device))
        return total

    @override(TorchLearner)
    def apply_gradients(self, gradients_dict: ParamDict) -> None:
        grads = [g for g in gradients_dict.values() if g is not None]
        norms = getattr(self, "_gradient_norms", None) or (
            [torch.stack([torch.norm(g.detach(), 2.0) for g in grads])] if grads else [])
        self._gradient_norms = []
        # With mixed precision RLlib's grad scalers expect inf steps and skip them themselves, lowering
        # their scale; nothing to train leaves nothing to check.
        if self._grad_scalers is not None or not norms or bool(torch.cat(norms).isfinite().all()):
            super().apply_gradients(gradients_dict)   # the step's one host read is the bool above
            return
        bad = [self._parameter_name(ref) for ref, g in gradients_dict.items()
               if g is not None and not torch.isfinite(g).all()]
        logger.warning("%s: skipped a gradient step: %d gradient tensor(s) hold NaN or inf (%s)",
                       type(self).__name__, len(bad), ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else ""))
        self.metrics.log_value((ALL_MODULES, NONFINITE_GRADIENT_STEPS_KEY), 1, reduce="lifetime_sum")

    def _parameter_name(self, ref) -> str:
        """The module's name of the parameter RLlib keys ``ref`` by (for the warning only)."""
        param = self._params[ref]
        for module_id in self.module.keys():
            for name, p in self.module[module_id].named_parameters():
                if p is param:
                    return f"{module_id}/{name}"
        return str(ref)
