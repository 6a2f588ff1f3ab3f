"""Image augmentation of the augmentation baselines (arms ``drac``, ``drq-sac`` and their gaze versions).

``random_shift`` is DrQ-v2's random shift (Yarats et al. 2021, "Mastering Visual Continuous Control:
Improved Data-Augmented Reinforcement Learning"; DrAC, Raileanu et al. 2021, uses the same "crop"):
every image of a batch is padded by ``pad`` pixels on each side, repeating its border pixels, and
cropped back to its own size at a random whole-pixel offset in ``[0, 2 pad]`` per axis, drawn for each
image independently. DrQ-v2 pads 84 px images by 4; here the pad scales with the image
(``shift_pad``: 4 at 84 px, 5 at 96, 6 at 128, 2 at 48), so a shift moves the same share of the scene.

The crop is a ``grid_sample`` at the window's pixel centres, as DrQ-v2's: one batched call on the
tensors' own device (the learner's), no loop over images and no copy to the host. DrQ-v2 samples
bilinearly; at whole-pixel offsets the sampling points fall on pixel centres, where nearest and
bilinear sampling give the same values, and nearest keeps uint8 images exact.

Written in plain torch rather than with kornia: the operation is these few lines, and a library for
it would be one more dependency of every install for one function.

Shapes: images ``(B, H, W, C)``, channels last as the envs give them, uint8 or float; the result has
the same shape, dtype and device. Observations may be a dict: only its images (the 4-D entries, the
envs' ``"rgb"``) are shifted; a state vector or the target's position passes through unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The augmentations an arm may name (``.gaze(augmentation=...)``); "none": no augmentation.
AUGMENTATIONS = ("none", "shift")
# DrQ-v2's pad at its image size.
REFERENCE_SIZE, REFERENCE_PAD = 84, 4


def shift_pad(size: int) -> int:
    """The random shift's pad for an image side of ``size`` pixels: DrQ-v2's 4 px at 84 px, scaled
    (at least 1)."""
    return max(1, round(REFERENCE_PAD * size / REFERENCE_SIZE))


def random_shift(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``images (B, H, W, C)`` each shifted by a random whole number of pixels in ``[-pad, pad]`` per
    axis (``shift_pad`` of that axis), the border pixels repeated where the image moved away; same
    shape, dtype and device. ``generator``: where the offsets are drawn from (default torch's)."""
    if images.dim() != 4:
        raise ValueError(f"random_shift needs images of shape (B, H, W, C); got shape {tuple(images.shape)}")
    b, h, w, _ = images.shape
    pad_h, pad_w = shift_pad(h), shift_pad(w)
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (pad_w, pad_w, pad_h, pad_h), mode="replicate")
    # pixel centres of the window at offset 0, in the padded image's normalised coordinates
    # (align_corners=False: pixel j of P spans [2j/P - 1, 2(j+1)/P - 1])
    xs = (2 * torch.arange(w, device=images.device) + 1) / (w + 2 * pad_w) - 1
    ys = (2 * torch.arange(h, device=images.device) + 1) / (h + 2 * pad_h) - 1
    grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)         # (H, W, 2): x, y
    offsets = torch.stack([torch.randint(0, 2 * pad + 1, (b,), device=images.device, generator=generator)
                           for pad in (pad_w, pad_h)], dim=-1)                             # (B, 2) pixels
    step = torch.tensor([2 / (w + 2 * pad_w), 2 / (h + 2 * pad_h)], device=images.device)
    grid = grid[None] + (offsets * step)[:, None, None, :]                                  # (B, H, W, 2)
    shifted = F.grid_sample(padded, grid, mode="nearest", padding_mode="border", align_corners=False)
    shifted = shifted.permute(0, 2, 3, 1)
    return shifted.round().to(images.dtype) if not images.dtype.is_floating_point else shifted.to(images.dtype)


def augment_observations(obs: torch.Tensor | dict[str, torch.Tensor], augmentation: str
                         ) -> torch.Tensor | dict[str, torch.Tensor]:
    """``obs`` with its images augmented by ``augmentation`` (one of ``AUGMENTATIONS``): new tensors,
    the input left as it was. A dict keeps its other entries (the same tensors)."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation={augmentation!r} is not known; allowed values are {AUGMENTATIONS}")
    if augmentation == "none":
        return obs
    if isinstance(obs, dict):
        images = [key for key, value in obs.items() if value.dim() == 4]
        if not images:
            raise ValueError(f"augmentation={augmentation!r} needs image observations (B, H, W, C); the "
                             f"observations hold none (keys {sorted(obs)})")
        return {key: random_shift(value) if key in images else value for key, value in obs.items()}
    if obs.dim() != 4:
        raise ValueError(f"augmentation={augmentation!r} needs image observations (B, H, W, C); got shape "
                         f"{tuple(obs.shape)}")
    return random_shift(obs)
