"""Return-guided contrastive learning for the gaze: feature/return memory, triplet mining, loss.

Idea (METHOD.md): two visually similar states whose returns differ are told apart by
task-relevant features, so the gaze should make them easy to tell apart. Mining looks for each
anchor's nearest neighbours in the memory (cosine similarity of pre-attention feature maps) and
labels them by return; the loss is a triplet margin loss on cosine distance after the gaze.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LABEL_RULES = ("threshold", "relative")


class FeatureReturnBuffer:
    """Ring buffer of detached, flattened pre-attention feature maps ``(N, D)`` and returns ``(N,)``.

    Lives on one device (the learner's), so mining runs where the learner runs. Each row also keeps
    its inverse L2 norm so cosine similarities need one matmul per chunk.
    """

    def __init__(self, capacity: int, feature_dim: int, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"capacity={capacity!r}: must be >= 1")
        self.capacity, self.feature_dim = capacity, feature_dim
        self.features = torch.zeros(capacity, feature_dim, device=device)
        self.inv_norms = torch.zeros(capacity, device=device)
        self.returns = torch.zeros(capacity, device=device)
        self.size = 0
        self._next = 0

    def __len__(self) -> int:
        return self.size

    @torch.no_grad()
    def push(self, features: torch.Tensor, returns: torch.Tensor) -> None:
        """Add ``features (N, D)`` (any leading shape flattened to D) and ``returns (N,)``."""
        features = features.detach().reshape(features.shape[0], -1).to(self.features)
        returns = returns.detach().reshape(-1).to(self.returns)
        if features.shape[0] > self.capacity:  # only the newest rows would survive anyway
            features, returns = features[-self.capacity:], returns[-self.capacity:]
        n = features.shape[0]
        idx = (self._next + torch.arange(n, device=self.features.device)) % self.capacity
        self.features[idx] = features
        self.inv_norms[idx] = 1.0 / features.norm(dim=1).clamp_min(1e-8)
        self.returns[idx] = returns
        self._next = (self._next + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def filled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the filled part: features ``(N, D)``, inverse norms ``(N,)``, returns ``(N,)``."""
        return self.features[:self.size], self.inv_norms[:self.size], self.returns[:self.size]

    def state_dict(self) -> dict:
        return {"features": self.features[:self.size].cpu(), "returns": self.returns[:self.size].cpu(),
                "next": self._next}

    def load_state_dict(self, state: dict) -> None:
        self.size, self._next = 0, 0
        self.push(state["features"], state["returns"])
        self._next = state["next"] % self.capacity


@dataclass
class Triplets:
    """Indices of mined triplets: ``anchor`` into the anchors, ``positive``/``negative`` into the
    buffer, each ``(T,)``; ``num_anchors`` is how many anchors were searched."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    num_anchors: int

    @property
    def valid_fraction(self) -> float:
        return self.anchor.numel() / max(self.num_anchors, 1)


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, bank_inv_norms: torch.Tensor,
                       k: int, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine neighbours of ``queries (A, D)`` in ``bank (N, D)``, in chunks of the bank.

    Returns ``(similarities (A, k'), indices (A, k'))`` sorted most similar first, ``k' = min(k, N)``.
    """
    k = min(k, bank.shape[0])
    q = queries.float()
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-8)
    best_sim = q.new_full((q.shape[0], 0), float("-inf"))
    best_idx = torch.zeros(q.shape[0], 0, dtype=torch.long, device=q.device)
    for start in range(0, bank.shape[0], chunk_size):
        sims = (q @ bank[start:start + chunk_size].float().T) * bank_inv_norms[start:start + chunk_size]
        sims, idx = sims.topk(min(k, sims.shape[1]), dim=1)
        best_sim, order = torch.cat([best_sim, sims], 1).topk(min(k, best_sim.shape[1] + sims.shape[1]), dim=1)
        best_idx = torch.cat([best_idx, idx + start], 1).gather(1, order)
    return best_sim, best_idx


@torch.no_grad()
def mine_triplets(anchor_features: torch.Tensor, anchor_returns: torch.Tensor,
                  buffer: FeatureReturnBuffer, *, k: int, label_rule: str = "threshold",
                  threshold: float = 0.0, relative_gap: float = 0.0,
                  chunk_size: int = 4096) -> Triplets:
    """For each anchor, pick the nearest positive and the nearest negative among its k neighbours.

    Args:
        anchor_features: ``(A, D)`` (flattened pre-attention maps); anchor_returns: ``(A,)``.
        label_rule: ``"threshold"``: a state is "high" when its return >= ``threshold``; neighbours
            on the anchor's side are positives, the others negatives. ``"relative"``: neighbours
            whose return is within ``relative_gap`` of the anchor's are positives, the rest negatives.

    Anchors lacking either a positive or a negative among their neighbours are dropped.
    """
    if label_rule not in LABEL_RULES:
        raise ValueError(f"label_rule={label_rule!r}: allowed values are {LABEL_RULES}")
    num_anchors = anchor_features.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=anchor_features.device)
    if len(buffer) == 0 or num_anchors == 0:
        return Triplets(empty, empty, empty, num_anchors)
    bank, inv_norms, bank_returns = buffer.filled()
    _, nbr = nearest_neighbours(anchor_features.reshape(num_anchors, -1), bank, inv_norms, k, chunk_size)
    nbr_returns = bank_returns[nbr]                                     # (A, k)
    anchor_returns = anchor_returns.reshape(-1, 1).to(nbr_returns)
    if label_rule == "threshold":
        positive = (nbr_returns >= threshold) == (anchor_returns >= threshold)
    else:
        positive = (nbr_returns - anchor_returns).abs() <= relative_gap
    negative = ~positive
    valid = positive.any(1) & negative.any(1)
    # argmax on a bool row returns the first True: neighbours are sorted most similar first.
    first_pos = positive.float().argmax(1)
    first_neg = negative.float().argmax(1)
    anchors = valid.nonzero().squeeze(1)
    return Triplets(
        anchor=anchors,
        positive=nbr[anchors, first_pos[anchors]],
        negative=nbr[anchors, first_neg[anchors]],
        num_anchors=num_anchors,
    )


def triplet_cosine_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                        margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triplet margin loss on cosine distance ``1 - cos``; inputs ``(T, ...)`` flattened per row.

    Returns ``(mean loss (), share of active triplets ())``; active = loss > 0.
    """
    a, p, n = (x.flatten(1) for x in (anchor, positive, negative))
    d_ap = 1.0 - torch.nn.functional.cosine_similarity(a, p, dim=1, eps=1e-8)
    d_an = 1.0 - torch.nn.functional.cosine_similarity(a, n, dim=1, eps=1e-8)
    per_triplet = torch.relu(d_ap - d_an + margin)
    return per_triplet.mean(), (per_triplet > 0).float().mean()
