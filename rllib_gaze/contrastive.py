"""Return-guided contrastive learning for the gaze: feature/return memory, triplet mining, loss.

Idea (docs/method.md): two visually similar states whose returns differ are told apart by
task-relevant features, so the gaze should make them easy to tell apart. Mining looks for each
anchor's nearest neighbours in the memory (cosine similarity of pre-attention feature maps) and
labels them by return; the loss is a triplet margin loss on cosine distance after the gaze.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rllib_gaze.gae import backward_discounted_sum
from rllib_gaze.gaze import cell_centres, glimpse

LABEL_RULES = ("threshold", "above", "relative")
# What trains the gaze from mined triplets: the paper's triplet loss, or our fixation search (the
# centre regressed onto the cell that best tells the positive from the negative), or both.
OBJECTIVES = ("triplet", "fixation", "fixation+triplet")
SIMILARITIES = ("map", "centred_map", "glimpse")
TRIPLET_GAZES = ("anchor", "each")
# Where an anchor's neighbours come from: the memory of earlier updates, or its own episode.
MININGS = ("memory", "episode")
# How often an anchor's neighbours are searched: in every minibatch it is drawn in, or once per update
# (the first epoch's positive and negative, reused by the later epochs: the memory only changes
# between updates).
NEIGHBOURS = ("per_minibatch", "per_update")


def search_keys(maps: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """Unit-norm neighbour-search keys ``(N, D')`` of feature maps ``(N, C, H, W)``.

    ``pool > 1`` averages ``pool x pool`` cells first (ceil mode), cutting the cost of the exact
    search by about ``pool^2`` while keeping the layout of what is where.
    """
    maps = maps.float()
    if pool > 1:
        maps = torch.nn.functional.avg_pool2d(maps, pool, ceil_mode=True)
    keys = maps.flatten(1)
    return keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-8)


class FeatureReturnMemory:
    """The feature/return memory: detached pre-attention feature maps ``(N, C, H, W)``, their search
    keys and returns ``(N,)``, kept in a ring (the newest ``capacity`` rows).

    Lives on one device (the learner's), so mining runs where the learner runs. Memory:
    ``capacity x (C*H*W + C*H*W/pool^2 + 1)`` floats.
    """

    def __init__(self, capacity: int, map_shape: tuple[int, int, int], pool: int = 1,
                 device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"capacity={capacity!r}: must be >= 1")
        if pool < 1:
            raise ValueError(f"pool={pool!r}: must be >= 1")
        self.capacity, self.map_shape, self.pool = capacity, tuple(map_shape), pool
        self.maps = torch.zeros(capacity, *map_shape, device=device)
        key_dim = search_keys(torch.zeros(1, *map_shape), pool).shape[1]
        self.keys = torch.zeros(capacity, key_dim, device=device)
        self.returns = torch.zeros(capacity, device=device)
        self.size = 0
        self._next = 0

    def __len__(self) -> int:
        return self.size

    @torch.no_grad()
    def push(self, maps: torch.Tensor, returns: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        """Add ``maps (N, C, H, W)`` and ``returns (N,)``; the oldest rows make room. ``keys (N, D')``:
        their ``search_keys`` with this memory's pool when the caller has them already."""
        maps = maps.detach().to(self.maps)
        returns = returns.detach().reshape(-1).to(self.returns)
        if maps.shape[0] > self.capacity:  # only the newest rows would survive anyway
            maps, returns = maps[-self.capacity:], returns[-self.capacity:]
            keys = None if keys is None else keys[-self.capacity:]
        n = maps.shape[0]
        idx = (self._next + torch.arange(n, device=self.maps.device)) % self.capacity
        self.maps[idx] = maps
        self.keys[idx] = search_keys(maps, self.pool) if keys is None else keys.detach().to(self.keys)
        self.returns[idx] = returns
        self._next = (self._next + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def filled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the filled part: maps ``(N, C, H, W)``, keys ``(N, D')``, returns ``(N,)``."""
        return self.maps[:self.size], self.keys[:self.size], self.returns[:self.size]

    def nbytes(self) -> int:
        """Bytes ``state_dict()`` holds (the filled maps and returns)."""
        maps, _, returns = self.filled()
        return maps.numel() * maps.element_size() + returns.numel() * returns.element_size()

    def state_dict(self) -> dict:
        """The filled rows oldest first (``maps (N, C, H, W)``, ``returns (N,)``), on the CPU."""
        order = torch.arange(self.size, device=self.maps.device)
        if self.size == self.capacity:
            order = (order + self._next) % self.capacity
        return {"maps": self.maps[order].cpu(), "returns": self.returns[order].cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Refill from ``state_dict()``, also of a memory with another capacity (newest rows kept)."""
        self.size, self._next = 0, 0
        self.push(state["maps"], state["returns"])


@dataclass
class RowBank:
    """Rows to mine in that are not the memory (``mining="episode"``: this update's rows so far):
    maps ``(N, C, H, W)``, their search keys ``(N, D')`` made with ``pool``, returns ``(N,)``.
    ``mine_rows`` reads it as it reads a ``FeatureReturnMemory``."""

    maps: torch.Tensor
    keys: torch.Tensor
    returns: torch.Tensor
    pool: int

    def __len__(self) -> int:
        return self.maps.shape[0]

    def filled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.maps, self.keys, self.returns


def chunk_steps(ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's episode chunk and its step within it, ``(N,)`` int64 each, in a train batch of chunks
    laid end to end, ``ends (N,)`` bool marking each chunk's last row (in RLlib's layout the extra row,
    loss mask False; with ``values_from_sampling`` the terminated or truncated row)."""
    ends = ends.bool()
    chunk = torch.cumsum(ends.long(), 0) - ends.long()                  # an end row closes its chunk
    starts = torch.cat([ends.new_zeros(1, dtype=torch.long), ends.nonzero().squeeze(1) + 1])
    return chunk, torch.arange(ends.shape[0], device=ends.device) - starts[chunk]


@torch.no_grad()
def discounted_return_to_go(rewards: torch.Tensor, terminateds: torch.Tensor, loss_mask: torch.Tensor,
                            bootstrap: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return-to-go ``(N,)`` of each row of a train batch laid out as RLlib's learner
    connector lays it: each episode chunk's rows in order, then one extra row (``loss_mask``
    False) holding the observation after the chunk's last step.

    ``G_t = r_t + gamma * G_{t+1}`` within a chunk, 0 after a termination, and at each extra row
    ``G = bootstrap`` (``(N,)``; only its values at the extra rows are read: the critic's V there).

    Computed where the rows are, without reading them on the host (``backward_discounted_sum``).
    """
    mask = loss_mask.bool()
    coeff = torch.where(mask & ~terminateds.bool(), gamma, 0.0)
    value = torch.where(mask, rewards.to(torch.float64), bootstrap.to(torch.float64))
    return backward_discounted_sum(value, coeff).float()


@torch.no_grad()
def chunk_return_to_go(rewards: torch.Tensor, ends: torch.Tensor, next_values: torch.Tensor,
                       gamma: float) -> torch.Tensor:
    """Discounted return-to-go ``(N,)`` of each row of a train batch of episode chunks laid end to end
    without extra rows (``values_from_sampling``): ``G_t = r_t + gamma * G_{t+1}`` within a chunk and
    ``G_t = r_t + gamma * next_values_t`` at its last row (``ends (N,)``), where ``next_values (N,)``
    holds the critic's V of the observation after that step (0 after a termination; only its values
    at the ends are read). Reads nothing on the host."""
    ends = ends.bool()
    coeff = torch.where(ends, 0.0, gamma)
    value = rewards.to(torch.float64) + gamma * torch.where(ends, next_values.to(torch.float64), 0.0)
    return backward_discounted_sum(value, coeff).float()


@dataclass
class Triplets:
    """Indices of mined triplets: ``anchor`` into the anchors, ``positive``/``negative`` into the
    memory, each ``(T,)``; ``num_anchors`` is how many anchors were searched; ``label_agreement``
    the share of searched anchors whose threshold label equals their nearest neighbour's."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    num_anchors: int
    label_agreement: float = float("nan")  # share of anchors labelled as their nearest neighbour

    @property
    def valid_fraction(self) -> float:
        return self.anchor.numel() / max(self.num_anchors, 1)


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_size: int = 4096,
                       groups: tuple[torch.Tensor, torch.Tensor] | None = None,
                       apart: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k neighbours of unit-norm ``queries (A, D)`` among unit-norm ``bank (N, D)`` rows
    by cosine similarity, one matmul per ``chunk_size`` rows of the bank.

    ``groups``: ``(query_groups (A,), bank_groups (N,))``; a query's neighbours are then only bank
    rows of its own group (others score ``-inf``, so a group smaller than k leaves ``-inf`` entries).
    ``apart``: ``(query_steps (A,), bank_steps (N,), gap)``; bank rows fewer than ``gap`` steps from
    the query are excluded the same way (with ``groups`` = episodes: the same scene at another time).

    Returns ``(similarities (A, k'), indices (A, k'))``, most similar first, ``k' = min(k, N)``.
    """
    k = min(k, bank.shape[0])
    best_sim = queries.new_full((queries.shape[0], 0), float("-inf"))
    best_idx = torch.zeros(queries.shape[0], 0, dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], chunk_size):
        sims = queries @ bank[start:start + chunk_size].T
        if groups is not None:
            other = groups[0].view(-1, 1) != groups[1][start:start + chunk_size].view(1, -1)
            sims = sims.masked_fill(other, float("-inf"))
        if apart is not None:
            near = (apart[0].view(-1, 1) - apart[1][start:start + chunk_size].view(1, -1)).abs() < apart[2]
            sims = sims.masked_fill(near, float("-inf"))
        sims, idx = sims.topk(min(k, bank.shape[0] - start, chunk_size), dim=1)
        best_sim, order = torch.cat([best_sim, sims], 1).topk(min(k, best_sim.shape[1] + sims.shape[1]), dim=1)
        best_idx = torch.cat([best_idx, idx + start], 1).gather(1, order)
    return best_sim, best_idx


@dataclass
class MinedRows:
    """Mining's result for every searched anchor, fixed-size so that nothing is read on the host:
    ``positive``/``negative`` ``(A,)`` memory indices (arbitrary where not ``valid``), ``valid (A,)``
    whether the anchor has both among its neighbours, ``searched (A,)`` which anchors count (the
    others are padding), ``has_neighbour (A,)`` whether a searched anchor has a nearest neighbour and
    ``agrees (A,)`` whether its threshold label equals that neighbour's; ``label_agreement ()`` the
    share of those with a neighbour that agree (NaN when none has one), ``valid_fraction ()`` the share
    of searched anchors that are valid. ``of_rows`` rebuilds the shares from the per-anchor rows (the
    learner's cached neighbours, ``mining_neighbours="per_update"``)."""

    positive: torch.Tensor
    negative: torch.Tensor
    valid: torch.Tensor
    searched: torch.Tensor
    agrees: torch.Tensor
    has_neighbour: torch.Tensor
    label_agreement: torch.Tensor
    valid_fraction: torch.Tensor

    @classmethod
    def of_rows(cls, positive: torch.Tensor, negative: torch.Tensor, valid: torch.Tensor, searched: torch.Tensor,
                agrees: torch.Tensor, has_neighbour: torch.Tensor) -> MinedRows:
        """The per-anchor rows ``(A,)`` each and the shares they give (no host read)."""
        valid, has_neighbour = valid & searched, has_neighbour & searched
        return cls(positive=positive, negative=negative, valid=valid, searched=searched, agrees=agrees,
                   has_neighbour=has_neighbour,
                   label_agreement=(agrees & has_neighbour).sum() / has_neighbour.sum(),
                   valid_fraction=valid.sum() / searched.sum().clamp_min(1))


@torch.no_grad()
def mine_rows(anchor_maps: torch.Tensor, anchor_returns: torch.Tensor,
              memory: FeatureReturnMemory | RowBank, *, k: int, label_rule: str = "threshold",
              threshold: float | torch.Tensor = 0.0, relative_gap: float | torch.Tensor = 0.0,
              chunk_size: int = 4096, centre: torch.Tensor | None = None,
              bank_keys: torch.Tensor | None = None, searched: torch.Tensor | None = None,
              groups: tuple[torch.Tensor, torch.Tensor] | None = None,
              apart: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> MinedRows:
    """``mine_triplets`` without compaction: each anchor's nearest positive and nearest negative
    among its k neighbours, and whether it has both, as fixed-size tensors on the anchors' device
    (no host sync). ``threshold`` and ``relative_gap`` may be 0-dim tensors; ``searched (A,)``
    marks the anchors that count (default: all). The memory must not be empty.
    """
    if label_rule not in LABEL_RULES:
        raise ValueError(f"label_rule={label_rule!r}: allowed values are {LABEL_RULES}")
    _, own_keys, bank_returns = memory.filled()
    if centre is not None:
        anchor_maps = anchor_maps - centre
    else:
        bank_keys = own_keys
    if searched is None:
        searched = torch.ones(anchor_maps.shape[0], dtype=torch.bool, device=anchor_maps.device)
    sims, nbr = nearest_neighbours(search_keys(anchor_maps, memory.pool), bank_keys, k, chunk_size, groups, apart)
    nbr_returns = bank_returns[nbr]                                     # (A, k)
    anchor_returns = anchor_returns.reshape(-1, 1).to(nbr_returns)
    if label_rule == "threshold":
        positive = (nbr_returns >= threshold) == (anchor_returns >= threshold)
    elif label_rule == "above":
        positive = (nbr_returns >= threshold).expand_as(nbr)
    else:
        positive = (nbr_returns - anchor_returns).abs() <= relative_gap
    if groups is not None or apart is not None:
        found = sims > float("-inf")                                    # (A, k): not excluded
        positive, negative = positive & found, ~positive & found
    else:
        negative = ~positive
    valid = positive.any(1) & negative.any(1) & searched
    # argmax on a bool row returns the first True: neighbours are sorted most similar first.
    first_pos = positive.float().argmax(1, keepdim=True)
    first_neg = negative.float().argmax(1, keepdim=True)
    # How often an anchor's own label (its side of the threshold) is its nearest neighbour's: 0.5 is
    # chance, i.e. labels that visual similarity cannot predict. Only anchors that have a nearest
    # neighbour count (groups/apart may exclude every row); NaN when none has.
    agrees = (nbr_returns[:, 0] >= threshold) == (anchor_returns[:, 0] >= threshold)
    has_neighbour = searched & (sims[:, 0] > float("-inf")) if sims.shape[1] else torch.zeros_like(searched)
    return MinedRows.of_rows(nbr.gather(1, first_pos).squeeze(1), nbr.gather(1, first_neg).squeeze(1), valid,
                             searched, agrees, has_neighbour)


@torch.no_grad()
def mine_triplets(anchor_maps: torch.Tensor, anchor_returns: torch.Tensor,
                  memory: FeatureReturnMemory, *, k: int, label_rule: str = "threshold",
                  threshold: float = 0.0, relative_gap: float = 0.0,
                  chunk_size: int = 4096, centre: torch.Tensor | None = None,
                  bank_keys: torch.Tensor | None = None,
                  groups: tuple[torch.Tensor, torch.Tensor] | None = None,
                  apart: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> Triplets:
    """For each anchor, pick the nearest positive and the nearest negative among its k neighbours.

    Args:
        anchor_maps: ``(A, C, H, W)`` pre-attention maps; anchor_returns: ``(A,)``.
        label_rule: ``"threshold"``: a state is "high" when its return >= ``threshold``; neighbours
            on the anchor's side are positives, the others negatives. ``"above"`` (the rule the
            paper's reviewers describe): high neighbours are positives and low ones negatives,
            whatever the anchor's return. ``"relative"``: neighbours whose return is within
            ``relative_gap`` of the anchor's are positives, the rest negatives.

        centre: a map ``(C, H, W)`` subtracted from the anchors before their search keys are made
            (centred search); ``bank_keys`` must then be the memory's keys made the same way
            (``search_keys(maps - centre, pool)``). ``None``: the memory's own keys of raw maps.
        groups: ``(anchor_groups (A,), memory_groups (N,))``: neighbours only from the anchor's own
            group (e.g. its episode: triplets that share the scene); see ``nearest_neighbours``.
        apart: ``(anchor_steps (A,), memory_steps (N,), gap)``: no neighbour within ``gap`` steps.

    Anchors lacking either a positive or a negative among their neighbours are dropped. This reads
    the valid anchors on the host (a sync on a GPU); the learner uses ``mine_rows``, which does not.
    """
    if label_rule not in LABEL_RULES:
        raise ValueError(f"label_rule={label_rule!r}: allowed values are {LABEL_RULES}")
    num_anchors = anchor_maps.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=anchor_maps.device)
    if len(memory) == 0 or num_anchors == 0:
        return Triplets(empty, empty, empty, num_anchors)
    rows = mine_rows(anchor_maps, anchor_returns, memory, k=k, label_rule=label_rule, threshold=threshold,
                     relative_gap=relative_gap, chunk_size=chunk_size, centre=centre, bank_keys=bank_keys,
                     groups=groups, apart=apart)
    anchors = rows.valid.nonzero().squeeze(1)
    return Triplets(anchor=anchors, positive=rows.positive[anchors], negative=rows.negative[anchors],
                    num_anchors=num_anchors, label_agreement=rows.label_agreement.item())


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None, empty: float = 0.0) -> torch.Tensor:
    """Mean ``()`` of ``values (T,)`` over the rows where ``valid (T,)`` (all rows when ``None``),
    ``empty`` when none is; no host sync."""
    if valid is None:
        return values.mean()
    count = valid.sum()
    mean = torch.where(valid, values, 0.0).sum() / count.clamp_min(1)
    return mean if empty == 0.0 else torch.where(count > 0, mean, empty)


def attended_cosine(x: torch.Tensor, y: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``(T,)`` of the attended maps ``x * wx`` and ``y * wy``.

    ``x, y``: detached maps ``(T, C, H, W)``; ``wx, wy``: attention weights ``(T, H, W)``. Because a
    weight is shared by all channels of a cell, the channel sums are taken once, without grad, and
    only ``(T, H, W)`` tensors carry the gradient to the weights: the same value as
    ``cosine_similarity((x * wx).flatten(1), (y * wy).flatten(1))`` at a fraction of the cost.
    """
    with torch.no_grad():
        # cosine ignores each map's scale: rescale to max |value| 1 so squares cannot overflow
        x = x / x.flatten(1).abs().amax(1).clamp_min(1e-30).view(-1, 1, 1, 1)
        y = y / y.flatten(1).abs().amax(1).clamp_min(1e-30).view(-1, 1, 1, 1)
        xy = (x * y).sum(1)
        xx = (x * x).sum(1)
        yy = (y * y).sum(1)
    dot = (wx * wy * xy).flatten(1).sum(1)
    norm_x = (wx * wx * xx).flatten(1).sum(1).clamp_min(1e-16).sqrt()
    norm_y = (wy * wy * yy).flatten(1).sum(1).clamp_min(1e-16).sqrt()
    return dot / (norm_x * norm_y)


def glimpse_cosine(x: torch.Tensor, y: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``(T,)`` of what two gazes see: the weighted mean over cells of each map,
    ``sum_hw w * x / sum_hw w``, a ``(T, C)`` channel vector per map.

    ``x, y``: detached maps ``(T, C, H, W)`` (centre them first: raw ReLU maps are all positive and
    their glimpses nearly parallel); ``wx, wy``: weights ``(T, H, W)``. Unlike the cosine of whole
    attended maps, a glimpse forgets where in the fovea a feature lies, so it can only change by
    moving or reshaping the fovea, and it changes fast as the fovea moves from one object to another.
    """
    gx, gy = glimpse(x, wx), glimpse(y, wy)
    # cosine ignores scale: rescale to max |value| 1 so the squares cannot overflow
    gx = gx / gx.detach().abs().amax(1, keepdim=True).clamp_min(1e-30)
    gy = gy / gy.detach().abs().amax(1, keepdim=True).clamp_min(1e-30)
    return torch.nn.functional.cosine_similarity(gx, gy, dim=1, eps=1e-12)


def gaze_similarity(kind: str, x: torch.Tensor, y: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor,
                    mean_map: torch.Tensor | None = None) -> torch.Tensor:
    """Similarity ``(T,)`` of maps ``x, y (T, C, H, W)`` seen through weights ``wx, wy (T, H, W)``.

    ``kind`` in ``SIMILARITIES``: ``"map"``: cosine of the whole attended maps (``attended_cosine``);
    ``"centred_map"``: the same after subtracting ``mean_map (C, H, W)`` (the memory's mean map) from
    both; ``"glimpse"``: ``glimpse_cosine`` of the centred maps.
    """
    if kind not in SIMILARITIES:
        raise ValueError(f"similarity={kind!r}: allowed values are {SIMILARITIES}")
    if kind != "map" and mean_map is not None:
        x, y = x - mean_map, y - mean_map
    if kind == "glimpse":
        return glimpse_cosine(x, y, wx, wy)
    return attended_cosine(x, y, wx, wy)


def triplet_margin_loss(cos_ap: torch.Tensor, cos_an: torch.Tensor, margin: float,
                        valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triplet margin loss on cosine distance ``d = 1 - cos``, from cosines ``(T,)``, over the
    triplets where ``valid (T,)`` (all when ``None``; 0 when none is).

    Returns ``(mean loss (), share of active triplets ())``; active = loss > 0.
    """
    per_triplet = torch.relu((1.0 - cos_ap) - (1.0 - cos_an) + margin)
    return masked_mean(per_triplet, valid), masked_mean((per_triplet > 0).float(), valid)


# Gaze of feature maps (N, C, H, W) -> (weights (N, H, W), its parameters): GazeAPI.gaze_weights.
GazeWeights = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def gaze_triplet_loss(gaze_weights: GazeWeights, anchor: torch.Tensor, positive: torch.Tensor,
                      negative: torch.Tensor, *, similarity: str, triplet_gaze: str, margin: float,
                      mean_map: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The triplet loss on the gaze, for mined triplets of detached maps ``(T, C, H, W)`` each.

    ``triplet_gaze`` in ``TRIPLET_GAZES``: ``"anchor"``: the anchor's gaze weighs all three maps,
    so the loss can only fall by looking where the positive and the negative differ, not by pointing
    the negative's gaze elsewhere; ``"each"``: each map under its own gaze. ``similarity`` and
    ``mean_map`` as in ``gaze_similarity``. The gradient reaches only what ``gaze_weights`` computes
    with. ``valid (T,)``: the triplets that count (``mine_rows``' fixed-size rows; default all).

    Returns ``(mean loss (), share of active triplets (), cos_ap (T,), cos_an (T,))``.
    """
    if triplet_gaze == "anchor":
        w_a, _ = gaze_weights(anchor)
        w_p = w_n = w_a
    else:
        weights, _ = gaze_weights(torch.cat([anchor, positive, negative]))  # one batched call
        w_a, w_p, w_n = weights.split(anchor.shape[0])
    cos_ap = gaze_similarity(similarity, anchor, positive, w_a, w_p, mean_map)
    cos_an = gaze_similarity(similarity, anchor, negative, w_a, w_n, mean_map)
    loss, active = triplet_margin_loss(cos_ap, cos_an, margin=margin, valid=valid)
    return loss, active, cos_ap, cos_an


@torch.no_grad()
def fixation_targets(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                     pools: tuple[int, ...] = (1, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixation search: the cell of each anchor whose surroundings best tell its positive from its
    negative, and that cell's centre in the map's normalised coordinates.

    ``anchor, positive, negative``: centred maps ``(T, C, H, W)``. For each odd ``pool`` the maps
    are averaged over ``pool x pool`` cells around every cell (what a fovea of that size sees there;
    3 takes in neighbouring things, so a relation such as "agent next to target" becomes one
    vector), each cell's vector is normalised, and every anchor cell scores
    ``max_j cos(a_i, p_j) - max_j cos(a_i, n_j)``: what the anchor sees there has a twin somewhere
    in the positive and none in the negative. The scores of all ``pools`` are summed.

    Returns ``(centres (T, 2) as (x, y) in (-1, 1), best scores (T,))``.
    """
    def cells(maps: torch.Tensor, pool: int) -> torch.Tensor:  # (T, C, H, W) -> unit vectors (T, HW, C)
        if pool > 1:
            maps = torch.nn.functional.avg_pool2d(maps, pool, stride=1, padding=pool // 2,
                                                  count_include_pad=False)
        vectors = maps.float().flatten(2).transpose(1, 2)
        return vectors / vectors.norm(dim=2, keepdim=True).clamp_min(1e-8)

    score = 0.0
    for pool in pools:
        if pool < 1 or pool % 2 == 0:
            raise ValueError(f"pools={pools!r}: each must be an odd integer >= 1 (a window centred on its cell)")
        a = cells(anchor, pool)
        score = score + ((a @ cells(positive, pool).transpose(1, 2)).amax(2)
                         - (a @ cells(negative, pool).transpose(1, 2)).amax(2))
    best_score, best = score.max(1)                                     # (T,)
    height, width = anchor.shape[-2:]
    ys, xs = cell_centres(height, width, device=anchor.device)
    return torch.stack([xs[best % width], ys[best // width]], dim=1), best_score


@torch.no_grad()
def window_vote_targets(anchor: torch.Tensor, anchor_high: torch.Tensor, bank: torch.Tensor,
                        bank_high: torch.Tensor, *, k: int = 32, pool: int = 3,
                        chunk_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Window vote (a lead of issue 28): the window of each anchor whose look-alikes share its label.

    ``anchor (A, C, H, W)`` and ``bank (N, C, H, W)``: centred maps; ``anchor_high (A,)``,
    ``bank_high (N,)``: their labels (return above the threshold). Every ``pool x pool`` window of
    every map is one unit vector (its mean over the window). An anchor window scores the share of
    its ``k`` nearest windows, among all windows of all bank maps at any place, whose map has the
    anchor's label: a window that says which side of the threshold a state is on wherever it
    appears. Unlike the fixation search it needs no twin of the scene (no triplet), so it can work
    across scenes that differ. Cost: ``A*H*W x N*H*W`` dot products.

    Returns ``(centres (A, 2) as (x, y) in (-1, 1) of the best window, its score (A,))``.
    """
    def windows(maps: torch.Tensor) -> torch.Tensor:   # (M, C, H, W) -> unit vectors (M*H*W, C)
        pooled = torch.nn.functional.avg_pool2d(maps.float(), pool, stride=1, padding=pool // 2,
                                                count_include_pad=False)
        vectors = pooled.flatten(2).transpose(1, 2).reshape(-1, maps.shape[1])
        return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-8)

    height, width = anchor.shape[-2:]
    cells = height * width
    keys = windows(bank)
    key_high = bank_high.bool().repeat_interleave(cells)                   # (N*H*W,)
    scores = []
    for start in range(0, anchor.shape[0], max(1, chunk_size // cells)):  # a (queries x chunk) block at a time
        rows = slice(start, start + max(1, chunk_size // cells))
        _, nearest = nearest_neighbours(windows(anchor[rows]), keys, k, chunk_size)     # (a*H*W, k)
        same = key_high[nearest] == anchor_high[rows].bool().repeat_interleave(cells).view(-1, 1)
        scores.append(same.float().mean(1).view(-1, cells))
    score = torch.cat(scores)                                              # (A, H*W)
    best_score, best = score.max(1)
    ys, xs = cell_centres(height, width, device=anchor.device)
    return torch.stack([xs[best % width], ys[best // width]], dim=1), best_score


def fixation_loss(gaze_params: torch.Tensor, centres: torch.Tensor,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared distance ``()`` from the gaze centres ``gaze_params[:, :2]`` (of ``(T, 5)``
    foveal parameters) to the fixation search's ``centres (T, 2)``: the gaze is pulled to where the
    positive and the negative differ. ``valid (T,)``: the rows that count (default all)."""
    return masked_mean(((gaze_params[:, :2] - centres.detach()) ** 2).sum(1), valid)
