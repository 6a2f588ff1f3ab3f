"""The learner side of the return-guided contrastive loss, shared by GazePPOLearner and GazeSACLearner.

``ContrastiveGazeLearnerMixin`` goes before an RLlib torch learner in the bases. It keeps one
feature/return memory per module, mines triplets for the anchors of each gradient step against the
memory of *earlier* updates, returns the triplet loss on the gaze, pushes one update's rows into the
memory after the update, logs what the gaze does, and puts the memory in checkpoints. The algorithm's
learner decides which returns label the rows and where the loss enters its optimisers.

Nothing in a gradient step reads a tensor on the host (a sync on a GPU): anchors are drawn, mined,
labelled and scored in fixed-size tensors, metrics are logged as 0-dim tensors, and what must be
read (which staged rows enter the memory, the metrics' values) is read once per update
(``bench.py profile`` counts them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import Learner
from ray.rllib.utils.annotations import override
from ray.rllib.utils.typing import ModuleID, StateDict

from rllib_gaze.contrastive import (
    FeatureReturnMemory,
    MinedRows,
    RowBank,
    fixation_loss,
    fixation_targets,
    gaze_triplet_loss,
    masked_mean,
    mine_rows,
    search_keys,
)
from rllib_gaze.gaze import GAZE_PARAM_NAMES
from rllib_gaze.module import PRE_ATTENTION_FEATURES, TARGET, GazeAPI
from rllib_gaze.results import (
    CONTRASTIVE_ACTIVE_TRIPLET_FRAC_KEY,
    CONTRASTIVE_COS_AN_KEY,
    CONTRASTIVE_COS_AP_KEY,
    CONTRASTIVE_COS_GAP_KEY,
    CONTRASTIVE_FIXATION_LOSS_KEY,
    CONTRASTIVE_LABEL_AGREEMENT_KEY,
    CONTRASTIVE_LOSS_KEY,
    CONTRASTIVE_MEMORY_FILL_KEY,
    CONTRASTIVE_RETURN_SPREAD_KEY,
    CONTRASTIVE_RETURN_THRESHOLD_KEY,
    CONTRASTIVE_VALID_ANCHOR_FRAC_KEY,
    GAZE_GRAD_NORM_CONTRASTIVE_KEY,
    GAZE_TARGET_DISTANCE_CENTRE_KEY,
    GAZE_TARGET_DISTANCE_KEY,
    GAZE_WEIGHT_MEAN_KEY,
    GAZE_WEIGHT_STD_KEY,
    gaze_param_key,
)

# Learner state component holding the contrastive memory (in checkpoints, next to RLlib's
# "rl_module" and "optimizer", which already carries the gaze's Adam moments).
CONTRASTIVE_MEMORY = "contrastive_memory"
# Name of the gaze's own optimizer (when .gaze(gaze_lr=...) is set).
GAZE_OPTIMIZER = "gaze"
# Train-batch columns of each row's episode chunk and step within it (mining="episode"; the
# algorithm's learner adds them, ``rllib_gaze.contrastive.chunk_steps``).
EPISODE_CHUNK = "contrastive_episode_chunk"
EPISODE_STEP = "contrastive_episode_step"
# Train-batch column of each row's index in the update's batch (mining_neighbours="per_update"): it
# follows the row into shuffled minibatches, so a later epoch finds the row's cached neighbours.
ROW_INDEX = "contrastive_row"


class ContrastiveGazeLearnerMixin:
    """Memory, mining and triplet loss on the gaze, for a torch ``Learner`` whose modules implement
    ``GazeAPI`` and whose config has the ``.gaze()`` settings (``GazeConfigMixin``).

    Under ``num_learners > 1`` each learner keeps its own memory, filled from its own shard.
    Checkpoints carry the memory when it is at most ``contrastive_memory_checkpoint_mb``; a larger
    one is left out and refills within ``capacity / batch`` updates after a restore.
    """

    @override(Learner)
    def build(self) -> None:
        super().build()
        self._memories: dict[ModuleID, FeatureReturnMemory] = {}
        # this update's rows for the memory: (maps, returns, loss mask or None, (chunk, step, keys) or None)
        self._staged: dict[ModuleID, list[tuple]] = {}
        self._rows_left_to_stage: dict[ModuleID, int] = {}
        self._stage_fraction: dict[ModuleID, float] = {}
        self._mean_maps: dict[ModuleID, torch.Tensor] = {}  # (C, h, w) mean of each memory
        self._centred_keys: dict[ModuleID, torch.Tensor] = {}  # (N, D') keys of the centred memory
        self._first_minibatch: set[ModuleID] = set()
        # (threshold, spread) of each memory's returns, 0-dim tensors: computed once per update
        self._label_stats: dict[ModuleID, tuple[torch.Tensor | float, torch.Tensor]] = {}
        # keys logged as tensors this update, read on the host together at its end
        self._tensor_metrics: dict[ModuleID, set[str]] = {}
        # mining_neighbours="per_update": each row's mined neighbours this update (MinedRows' per-row
        # fields, (N,) each, "cached" marking the rows mined so far), and how many rows the update's
        # minibatches have held so far (a minibatch that starts after the first epoch reuses them)
        self._neighbours: dict[ModuleID, dict[str, torch.Tensor]] = {}
        self._rows_seen: dict[ModuleID, int] = {}
        # mining="episode": the staged rows concatenated into a bank, with how many staged pieces it holds
        self._bank: dict[ModuleID, tuple[int, RowBank, tuple[torch.Tensor, torch.Tensor]]] = {}

    def contrastive_memory(self, module_id: ModuleID) -> FeatureReturnMemory | None:
        """The feature/return memory of ``module_id`` (``None`` before its first rows are in)."""
        return self._memories.get(module_id)

    def _gaze_module(self, module_id: ModuleID) -> GazeAPI:
        """The module itself (not its DDP wrapper, under ``num_learners > 1``): its ``GazeAPI``."""
        return self.module[module_id].unwrapped()

    def _register_gaze_optimizer(self, module_id: ModuleID, config: Any) -> set[int]:
        """Give the gaze its own Adam when ``config.gaze_lr`` is set: its lr and eps, and its
        gradient clipped apart from the encoder's (RLlib clips per optimizer), so the RL loss's
        large encoder gradient cannot shrink it. Returns the ``id``s of the parameters it took."""
        gaze_params = self._gaze_module(module_id).gaze_parameters() if config.gaze_lr is not None else []
        if gaze_params:
            self.register_optimizer(module_id=module_id, optimizer_name=GAZE_OPTIMIZER,
                                    optimizer=torch.optim.Adam(gaze_params, eps=config.gaze_adam_eps),
                                    params=gaze_params, lr_or_lr_schedule=config.gaze_lr)
        return {id(p) for p in gaze_params}

    @override(Learner)
    def _make_batch_if_necessary(self, training_data):
        # The one place the whole post-connector train batch is seen: remember its size, so that
        # exactly one epoch's worth of rows is staged for the memory, subsampled uniformly when the
        # batch holds more rows than the memory can keep.
        batch = super()._make_batch_if_necessary(training_data)
        self._rows_left_to_stage = {mid: len(b) for mid, b in batch.policy_batches.items()}
        self._stage_fraction = {}
        for mid, b in batch.policy_batches.items():
            config = self.config.get_config_for_module(mid)
            if config.contrastive:
                # rows that may enter the memory (one host read per update)
                rows = int(b[Columns.LOSS_MASK].sum()) if Columns.LOSS_MASK in b else len(b)
                self._stage_fraction[mid] = min(1.0, config.contrastive_memory_capacity / max(rows, 1))
        self._staged = {mid: [] for mid in batch.policy_batches}
        self._bank = {}
        self._neighbours, self._rows_seen = {}, {}
        for mid, b in batch.policy_batches.items():
            if mid in self._stage_fraction and self.config.get_config_for_module(mid).mining_neighbours == "per_update":
                b[ROW_INDEX] = torch.arange(len(b), device=self._device)   # a column: it follows shuffles
                self._neighbours[mid] = _empty_neighbours(len(b), self._device)
                self._rows_seen[mid] = 0
        self._first_minibatch = set(batch.policy_batches)  # gradient norms are measured on these
        self._label_stats = {}  # the memory may have been changed from outside since the last update
        return batch

    def _contrastive_term(self, module_id: ModuleID, config: Any, batch: dict[str, Any], fwd_out: dict,
                          returns: torch.Tensor, rl_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The triplet loss of one gradient step: stage this minibatch's rows ``(B, C, h, w)`` with
        their detached ``returns (B,)`` for the memory, mine up to ``contrastive_num_anchors`` random
        valid rows against it, and on the first minibatch of an update log the norms of the
        gradients of ``rl_losses`` (metric key -> loss) and of the triplet loss on the gaze.

        With ``mining_neighbours="per_update"`` a minibatch that starts after the update's first
        epoch mines nothing: its anchors are the rows mined earlier in the update (up to
        ``contrastive_num_anchors`` of them, a random draw), with the neighbours found then."""
        features = fwd_out[PRE_ATTENTION_FEATURES].detach()
        mask = batch[Columns.LOSS_MASK].bool() if Columns.LOSS_MASK in batch else None
        chunks = (batch[EPISODE_CHUNK], batch[EPISODE_STEP]) if config.mining == "episode" else None
        self._stage(module_id, features, returns, mask, chunks)
        rows, reuse = None, False
        if module_id in self._neighbours:
            rows = batch[ROW_INDEX]
            reuse = self._rows_seen[module_id] >= self._neighbours[module_id]["cached"].shape[0]
            self._rows_seen[module_id] += features.shape[0]
            if reuse:   # the rows mined earlier first, a random draw of them
                mask = self._neighbours[module_id]["cached"][rows]
        anchors = _random_rows(mask, features.shape[0], config.contrastive_num_anchors, features.device)
        contrastive = self._contrastive_loss(module_id, config, features[anchors], returns[anchors],
                                             None if mask is None else mask[anchors],
                                             None if chunks is None else (chunks[0][anchors], chunks[1][anchors]),
                                             rows=None if rows is None else rows[anchors], reuse=reuse)
        if module_id in self._first_minibatch:
            self._first_minibatch.discard(module_id)
            self._log_gaze_gradients(module_id, {**rl_losses, GAZE_GRAD_NORM_CONTRASTIVE_KEY: contrastive})
        return contrastive

    def _log_gaze_gradients(self, module_id: ModuleID, losses: dict[str, torch.Tensor]) -> None:
        """Norms of each loss's gradient on the gaze's parameters (metric key -> loss): which
        objective trains the gaze."""
        params = [p for p in self._gaze_module(module_id).gaze_parameters() if p.requires_grad]
        norms = {}
        for name, part in losses.items():
            grads = (torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
                     if params and part.requires_grad else [])
            grads = [g.detach() for g in grads if g is not None]
            norms[name] = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                           if grads else 0.0)
        self._log_gaze_metrics(module_id, norms)

    def _contrastive_loss(self, module_id: ModuleID, config: Any, features: torch.Tensor,
                          returns: torch.Tensor, searched: torch.Tensor | None = None,
                          chunks: tuple[torch.Tensor, torch.Tensor] | None = None,
                          rows: torch.Tensor | None = None, reuse: bool = False) -> torch.Tensor:
        """Triplet loss on the gaze with anchors ``features (A, C, h, w)`` and their ``returns (A,)``;
        ``searched (A,)``: the anchors that count (default all; the others are padding that keeps
        the shapes fixed). With ``mining="episode"``, ``chunks`` holds the anchors' episode chunk
        and step ``(A,)`` each, and neighbours come from the rows of this update staged so far
        (this minibatch's included) of the same chunk. ``rows (A,)``: the anchors' rows in the
        update's batch (``mining_neighbours="per_update"``): their neighbours are cached, or with
        ``reuse`` read from that cache instead of searched. Reads nothing on the host."""
        memory = self._memories.get(module_id)
        zero = features.new_zeros(())
        metrics = {CONTRASTIVE_LOSS_KEY: zero, CONTRASTIVE_VALID_ANCHOR_FRAC_KEY: 0.0,
                   CONTRASTIVE_ACTIVE_TRIPLET_FRAC_KEY: 0.0,
                   CONTRASTIVE_MEMORY_FILL_KEY: 0.0 if memory is None else len(memory) / memory.capacity}
        if memory is None or len(memory) == 0 or features.shape[0] == 0:
            self._log_gaze_metrics(module_id, metrics)
            return zero

        threshold, spread = self._memory_label_stats(module_id, config)
        centred = config.mining_centred and module_id in self._mean_maps
        bank, groups, apart = memory, None, None
        if chunks is not None:
            bank, bank_chunks = self._staged_bank(module_id, memory.pool)
            if len(bank) == 0:
                self._log_gaze_metrics(module_id, metrics)
                return zero
            # the same chunk, never the anchor itself, and at least mining_gap steps away
            groups, apart = (chunks[0], bank_chunks[0]), (chunks[1], bank_chunks[1], max(config.mining_gap, 1))
            centred = False   # the centred keys are the memory's
        bank_maps = bank.filled()[0]
        if reuse:
            mined = self._cached_neighbours(module_id, rows, searched)
        else:
            mined = mine_rows(
                features, returns, bank, k=config.contrastive_k, label_rule=config.label_rule,
                threshold=threshold, relative_gap=config.relative_gap * spread, chunk_size=config.mining_chunk_size,
                centre=self._mean_maps[module_id] if centred else None,
                bank_keys=self._centred_keys.get(module_id) if centred else None, searched=searched,
                groups=groups, apart=apart,
            )
            if rows is not None:
                self._cache_neighbours(module_id, rows, mined)
        valid = mined.valid
        metrics[CONTRASTIVE_RETURN_THRESHOLD_KEY] = threshold
        metrics[CONTRASTIVE_RETURN_SPREAD_KEY] = spread
        metrics[CONTRASTIVE_VALID_ANCHOR_FRAC_KEY] = mined.valid_fraction
        metrics[CONTRASTIVE_LABEL_AGREEMENT_KEY] = mined.label_agreement
        # every anchor is scored (fixed shapes); only the valid triplets count in the loss and metrics
        gaze = self._gaze_module(module_id)
        positive, negative = bank_maps[mined.positive], bank_maps[mined.negative]
        mean_map = self._mean_maps.get(module_id)
        loss = zero
        anchor_gaze: list[tuple[torch.Tensor, torch.Tensor]] = []

        def gaze_weights(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # both objectives read the anchors' gaze: the head runs on them once
            if maps is not features:
                return gaze.gaze_weights(maps)
            if not anchor_gaze:
                anchor_gaze.append(gaze.gaze_weights(features))
            return anchor_gaze[0]

        if config.contrastive_objective != "fixation":
            loss, active, cos_ap, cos_an = gaze_triplet_loss(
                gaze_weights, features, positive, negative, similarity=config.contrastive_similarity,
                triplet_gaze=config.contrastive_triplet_gaze, margin=config.contrastive_margin,
                mean_map=mean_map, valid=valid)
            metrics[CONTRASTIVE_ACTIVE_TRIPLET_FRAC_KEY] = active
            # NaN for a step without a valid triplet
            metrics[CONTRASTIVE_COS_AP_KEY] = masked_mean(cos_ap.detach(), valid, empty=float("nan"))
            metrics[CONTRASTIVE_COS_AN_KEY] = masked_mean(cos_an.detach(), valid, empty=float("nan"))
            metrics[CONTRASTIVE_COS_GAP_KEY] = masked_mean((cos_ap - cos_an).detach(), valid, empty=float("nan"))
        if config.contrastive_objective != "triplet":
            centre = mean_map if mean_map is not None else zero
            centres, _ = fixation_targets(features - centre, positive - centre, negative - centre,
                                          tuple(config.fixation_pools))
            fixation = fixation_loss(gaze_weights(features)[1], centres, valid)
            metrics[CONTRASTIVE_FIXATION_LOSS_KEY] = fixation.detach()
            loss = loss + fixation
        metrics[CONTRASTIVE_LOSS_KEY] = loss.detach()
        self._log_gaze_metrics(module_id, metrics)
        return loss

    def _cache_neighbours(self, module_id: ModuleID, rows: torch.Tensor, mined: MinedRows) -> None:
        """Keep ``mined``'s per-anchor rows for the anchors' ``rows (A,)`` of the update's batch: the
        searched ones become cached, the padding ones not (no host read)."""
        cache = self._neighbours[module_id]
        for name in ("positive", "negative", "valid", "agrees", "has_neighbour"):
            cache[name][rows] = getattr(mined, name)
        cache["cached"][rows] = mined.searched

    def _cached_neighbours(self, module_id: ModuleID, rows: torch.Tensor, searched: torch.Tensor) -> MinedRows:
        """The cached neighbours of the anchors' ``rows (A,)``; ``searched (A,)``: those that count."""
        cache = self._neighbours[module_id]
        return MinedRows.of_rows(*(cache[name][rows] for name in ("positive", "negative", "valid")), searched,
                                 *(cache[name][rows] for name in ("agrees", "has_neighbour")))

    def _memory_label_stats(self, module_id: ModuleID, config: Any) -> tuple[torch.Tensor | float, torch.Tensor]:
        """``(threshold, spread)`` of the memory's returns as 0-dim tensors (the threshold is
        ``config.return_threshold`` when set), computed once per update: the memory changes only
        between updates."""
        if module_id not in self._label_stats:
            bank_returns = self._memories[module_id].filled()[2]
            threshold = (config.return_threshold if config.return_threshold is not None
                         else torch.quantile(bank_returns, config.return_quantile))
            self._label_stats[module_id] = (threshold, bank_returns.std(unbiased=False))
        return self._label_stats[module_id]

    def _log_gaze_metrics(self, module_id: ModuleID, metrics: dict[str, Any]) -> None:
        """Log ``metrics`` (window 1: the last gradient step's value) as they are; those that are
        tensors are read on the host together at the end of the update (``_read_tensor_metrics``)."""
        self.metrics.log_dict(metrics, key=module_id, window=1)
        self._tensor_metrics.setdefault(module_id, set()).update(
            key for key, value in metrics.items() if isinstance(value, torch.Tensor))

    def _read_tensor_metrics(self) -> None:
        """Replace this update's tensor-valued metrics by their values, read in one transfer
        (RLlib's reduce would read each tensor alone: two syncs per metric on a GPU)."""
        keys = [(mid, key) for mid, names in self._tensor_metrics.items() for key in sorted(names)]
        self._tensor_metrics = {}
        values = [self.metrics.peek(key, default=None) for key in keys]
        tensors = [(key, v) for key, v in zip(keys, values) if isinstance(v, torch.Tensor)]
        if not tensors:
            return
        read = torch.stack([v.detach().float().reshape(()) for _, v in tensors]).tolist()
        for ((mid, key), _), value in zip(tensors, read):
            self.metrics.log_value((mid, key), value, window=1)

    def _staged_bank(self, module_id: ModuleID, pool: int) -> tuple[RowBank, tuple[torch.Tensor, torch.Tensor]]:
        """This update's staged rows as a bank to mine in, and their episode chunk and step ``(N,)``
        each (``mining="episode"``). Rows outside the loss mask score as no one's neighbour. Built
        again only when rows were staged since (after the first epoch: once per update)."""
        staged = self._staged[module_id]
        if module_id in self._bank and self._bank[module_id][0] == len(staged):
            return self._bank[module_id][1:]
        maps, returns = torch.cat([s[0] for s in staged]), torch.cat([s[1] for s in staged])
        chunk, step, keys = (torch.cat([s[3][i] for s in staged]) for i in range(3))
        if staged[0][2] is not None:
            chunk = torch.where(torch.cat([s[2] for s in staged]), chunk, -1)   # never an anchor's chunk
        self._bank[module_id] = (len(staged), RowBank(maps, keys, returns, pool), (chunk, step))
        return self._bank[module_id][1:]

    def _stage(self, module_id: ModuleID, features: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor | None, chunks: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Keep this minibatch's rows for the memory until one epoch's worth has been seen: all of
        them, or (an epoch larger than the memory) a random ``_stage_fraction`` of them, valid rows
        (``mask``) first. Which staged rows are valid is read after the update (``_push_staged``).
        With ``chunks`` (each row's episode chunk and step) the rows also keep those and their
        search keys, for own-episode mining."""
        take = min(self._rows_left_to_stage.get(module_id, 0), features.shape[0])
        if take <= 0:
            return
        self._rows_left_to_stage[module_id] -= take
        keep = None if mask is None else mask[:take]
        count = math.ceil(take * self._stage_fraction.get(module_id, 1.0))
        rows = (_random_rows(keep, take, count, features.device) if count < take
                else torch.arange(take, device=features.device))
        episode = None
        if chunks is not None:
            pool = self.config.get_config_for_module(module_id).mining_pool   # the memory's pool too
            episode = (chunks[0][rows], chunks[1][rows], search_keys(features[rows], pool))
        self._staged.setdefault(module_id, []).append(
            (features[rows], returns[rows], None if keep is None else keep[rows], episode))

    def _push_staged(self) -> None:
        """Move the staged rows of this update into the memories: the valid ones (their masks read
        on the host in one transfer), a uniform draw of ``capacity`` of them when there are more;
        chunk by chunk, so the staged maps are copied once, into the memory."""
        for module_id, staged in self._staged.items():
            if not staged:
                continue
            sizes = [rows[0].shape[0] for rows in staged]
            valid = (torch.cat([rows[2] for rows in staged]).cpu() if staged[0][2] is not None
                     else torch.ones(sum(sizes), dtype=torch.bool))
            rows = valid.nonzero().squeeze(1)                       # on the host
            if module_id not in self._memories:
                self._memories[module_id] = self._new_memory(module_id, staged[0][0].shape[1:], staged[0][0].device)
            memory = self._memories[module_id]
            if rows.numel() > memory.capacity:
                rows = rows[torch.randperm(rows.numel())[:memory.capacity].sort().values]
            # each chunk's share of the (sorted) rows: host tensors, read as ints once
            starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            bounds = torch.searchsorted(rows, torch.tensor(starts)).tolist()
            for i, (features, returns, _, episode) in enumerate(staged):
                chunk = (rows[bounds[i]:bounds[i + 1]] - starts[i]).to(features.device)
                if chunk.numel():   # own-episode mining staged the rows' search keys (the memory's pool)
                    memory.push(features[chunk], returns[chunk], None if episode is None else episode[2][chunk])
        self._staged, self._bank, self._neighbours = {}, {}, {}

    @override(Learner)
    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        self._push_staged()
        self._update_mean_maps()
        self._read_tensor_metrics()

    def _update_mean_maps(self) -> None:
        """The memory's mean map, and its search keys after subtracting it (``mining_centred``),
        once per change of the memory (which also drops the labels' threshold and spread)."""
        self._label_stats = {}
        for module_id, memory in self._memories.items():
            if len(memory):
                maps = memory.filled()[0]
                self._mean_maps[module_id] = maps.mean(0)
                centre = getattr(self.module[module_id], "gaze_input_centre", None)
                if centre is not None:   # gaze_input="centred": the head reads the map minus this
                    centre.copy_(self._mean_maps[module_id])
                if self.config.get_config_for_module(module_id).mining_centred:
                    self._centred_keys[module_id] = search_keys(maps - self._mean_maps[module_id], memory.pool)

    @override(Learner)
    def get_state(self, components=None, *, not_components=None, **kwargs) -> StateDict:
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self._check_component(CONTRASTIVE_MEMORY, components, not_components):
            config_for = self.config.get_config_for_module
            state[CONTRASTIVE_MEMORY] = {
                module_id: memory.state_dict() for module_id, memory in self._memories.items()
                if memory.nbytes() <= config_for(module_id).contrastive_memory_checkpoint_mb * 2**20
            }
        return state

    @override(Learner)
    def set_state(self, state: StateDict) -> None:
        super().set_state(state)
        for module_id, memory_state in state.get(CONTRASTIVE_MEMORY, {}).items():
            memory = self._new_memory(module_id, memory_state["maps"].shape[1:], self._device)
            memory.load_state_dict(memory_state)  # push moves the rows to the memory's device
            self._memories[module_id] = memory
        self._update_mean_maps()

    def _new_memory(self, module_id: ModuleID, map_shape: tuple[int, int, int],
                    device: torch.device | str) -> FeatureReturnMemory:
        config = self.config.get_config_for_module(module_id)
        return FeatureReturnMemory(config.contrastive_memory_capacity, map_shape, pool=config.mining_pool,
                                   device=device)

    def _log_gaze_stats(self, module_id: ModuleID, params: torch.Tensor, obs: Any) -> None:
        if self._gaze_module(module_id).attention_kind == "patch":  # (B, h, w) weights
            stats = {GAZE_WEIGHT_MEAN_KEY: params.mean(), GAZE_WEIGHT_STD_KEY: params.std(unbiased=False)}
        else:  # GAUSSIAN_MODES: (B, 5) Gaussians
            stats = {}
            for name, column in zip(GAZE_PARAM_NAMES, params.unbind(-1)):
                stats[gaze_param_key(name, "mean")] = column.mean()
                stats[gaze_param_key(name, "std")] = column.std(unbiased=False)
            if isinstance(obs, dict) and TARGET in obs:
                # Where the relevant object is, in the map's normalised coordinates: how far the
                # centre is from it, next to how far a fixed central gaze would be.
                module = self._gaze_module(module_id)
                target = module.map_registration.image_to_map(obs[TARGET].to(params.dtype))
                centre = module.map_registration.image_to_map(target.new_tensor([0.5, 0.5]))
                stats[GAZE_TARGET_DISTANCE_KEY] = (params[:, :2] - target).norm(dim=-1).mean()
                stats[GAZE_TARGET_DISTANCE_CENTRE_KEY] = (target - centre).norm(dim=-1).mean()
        self._log_gaze_metrics(module_id, stats)


def _empty_neighbours(rows: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The per-row neighbour cache of an update of ``rows`` rows, nothing cached yet."""
    index = torch.zeros(rows, dtype=torch.long, device=device)
    flags = torch.zeros(rows, dtype=torch.bool, device=device)
    return {"positive": index, "negative": index.clone(), "valid": flags, "agrees": flags.clone(),
            "has_neighbour": flags.clone(), "cached": flags.clone()}


def _random_rows(mask: torch.Tensor | None, rows: int, count: int, device: torch.device) -> torch.Tensor:
    """``min(count, rows)`` distinct random row indices ``(n,)`` of ``rows`` rows, those where
    ``mask (rows,)`` holds (``None``: all) first, a uniform draw of them, without reading the mask
    on the host: drawn invalid rows (fewer valid rows than ``count``) are for the caller to mask."""
    keys = torch.rand(rows, device=device)
    if mask is not None:
        keys = keys.masked_fill(~mask, 2.0)  # invalid rows after every valid one
    return keys.topk(min(count, rows), largest=False).indices
