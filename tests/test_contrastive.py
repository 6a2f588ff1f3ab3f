import pytest
import torch

from rllib_gaze.contrastive import (
    FeatureReturnMemory,
    attended_cosine,
    chunk_steps,
    gaze_similarity,
    gaze_triplet_loss,
    glimpse_cosine,
    mine_rows,
    mine_triplets,
    nearest_neighbours,
    search_keys,
    triplet_margin_loss,
    window_vote_targets,
)
from rllib_gaze.gaze import cell_centres


def maps(rows):
    """Vectors (N, D) as 1x1 feature maps (N, D, 1, 1): D channels, one cell."""
    return torch.as_tensor(rows, dtype=torch.float32).view(len(rows), -1, 1, 1)


def memory_of(rows, returns, capacity=None):
    m = maps(rows)
    memory = FeatureReturnMemory(capacity or len(m), m.shape[1:])
    memory.push(m, torch.as_tensor(returns, dtype=torch.float32))
    return memory


def test_memory_is_a_ring_that_keeps_the_newest_rows():
    memory = FeatureReturnMemory(4, (2, 1, 1))
    memory.push(maps(torch.arange(6.0).view(3, 2)), torch.tensor([0.0, 1.0, 2.0]))
    memory.push(maps(torch.arange(6.0, 12.0).view(3, 2)), torch.tensor([3.0, 4.0, 5.0]))
    stored, keys, rets = memory.filled()
    assert len(memory) == 4
    assert sorted(rets.tolist()) == [2.0, 3.0, 4.0, 5.0]
    assert torch.allclose(keys, torch.nn.functional.normalize(stored.flatten(1), dim=1))
    memory.push(torch.zeros(9, 2, 1, 1), torch.full((9,), 7.0))  # more rows than capacity
    assert len(memory) == 4 and torch.all(memory.filled()[2] == 7.0)


def test_memory_state_round_trip():
    memory = memory_of(torch.randn(5, 3), torch.arange(5.0), capacity=8)
    other = FeatureReturnMemory(8, (3, 1, 1))
    other.load_state_dict(memory.state_dict())
    assert len(other) == 5
    assert torch.equal(other.filled()[0], memory.filled()[0]) and torch.equal(other.filled()[2], memory.filled()[2])


def test_wrapped_memory_state_is_oldest_first_and_fits_another_capacity():
    memory = memory_of(torch.randn(6, 2), torch.arange(6.0), capacity=4)  # rows 2..5 kept, the ring wrapped
    assert memory.state_dict()["returns"].tolist() == [2.0, 3.0, 4.0, 5.0]
    smaller, larger = FeatureReturnMemory(3, (2, 1, 1)), FeatureReturnMemory(8, (2, 1, 1))
    smaller.load_state_dict(memory.state_dict())
    larger.load_state_dict(memory.state_dict())
    assert sorted(smaller.filled()[2].tolist()) == [3.0, 4.0, 5.0]  # the newest rows
    assert sorted(larger.filled()[2].tolist()) == [2.0, 3.0, 4.0, 5.0] and len(larger) == 4
    larger.push(torch.zeros(1, 2, 1, 1), torch.tensor([9.0]))      # no stale rows counted
    assert len(larger) == 5 and sorted(larger.filled()[2].tolist()) == [2.0, 3.0, 4.0, 5.0, 9.0]


def test_pooled_search_keys_average_cells_before_normalising():
    m = torch.arange(2 * 3 * 3, dtype=torch.float32).view(1, 2, 3, 3)
    keys = search_keys(m, pool=2)              # ceil mode: 3x3 cells -> 2x2 blocks
    pooled = torch.nn.functional.avg_pool2d(m, 2, ceil_mode=True)
    assert keys.shape == (1, 8)
    assert torch.allclose(keys, torch.nn.functional.normalize(pooled.flatten(1), dim=1))
    assert torch.allclose(search_keys(m, pool=1), torch.nn.functional.normalize(m.flatten(1), dim=1))


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_neighbour_search_is_exact(chunk_size):
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(50, 16), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(9, 16), dim=1)
    sims, idx = nearest_neighbours(queries, bank, k=5, chunk_size=chunk_size)
    expected_sims, expected_idx = (queries @ bank.T).topk(5, dim=1)
    assert torch.equal(idx, expected_idx)
    assert torch.allclose(sims, expected_sims, atol=1e-6)


def constructed_set():
    """Memory rows: directions around the circle; returns chosen so the right triplets are known.

    Anchor 0 points along e0. Its neighbours by similarity: row 0 (e0, return 1), row 1 (close, return 0),
    row 2 (further, return 1), row 3 (opposite, return 0).
    """
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    rows = torch.stack([e0, e0 + 0.2 * e1, e0 + 0.6 * e1, -e0])
    rets = torch.tensor([1.0, 0.0, 1.0, 0.0])
    return memory_of(rows, rets)


def test_mining_finds_the_known_triplets():
    memory = constructed_set()
    anchors = maps([[1.0, 0.0], [1.0, 0.3]])
    t = mine_triplets(anchors, torch.tensor([1.0, 0.0]), memory, k=3, threshold=0.5)
    assert t.anchor.tolist() == [0, 1]
    # high-return anchor: nearest same-side neighbour is row 0, nearest other-side row 1
    # low-return anchor at 16.7 degrees: rows by angle 11.3 (row 1), 31.0 (row 2), 0 (row 0);
    # positive = row 1 (low), negative = nearest high row = row 2
    assert t.positive.tolist() == [0, 1]
    assert t.negative.tolist() == [1, 2]
    assert t.valid_fraction == 1.0


def test_anchors_without_a_negative_among_k_neighbours_are_dropped():
    memory = constructed_set()
    t = mine_triplets(maps([[1.0, 0.0]]), torch.tensor([1.0]), memory, k=1, threshold=0.5)
    assert t.anchor.numel() == 0 and t.valid_fraction == 0.0


def test_relative_rule_labels_by_distance_to_the_anchor_return():
    memory = memory_of([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2]], [0.9, 0.5, 0.1])
    t = mine_triplets(maps([[1.0, 0.05]]), torch.tensor([0.55]), memory, k=3,
                      label_rule="relative", relative_gap=0.1)
    assert t.positive.tolist() == [1]          # |0.5 - 0.55| <= 0.1
    assert t.negative.tolist() == [0]          # nearest of the rest


@pytest.mark.parametrize("case", ["empty", "all_equal", "fewer_than_k"])
def test_degenerate_memories_give_no_triplets_not_errors(case):
    if case == "empty":
        memory = FeatureReturnMemory(8, (2, 1, 1))
    elif case == "all_equal":
        memory = memory_of(torch.randn(6, 2), torch.ones(6))
    else:
        memory = memory_of([[1.0, 0.0], [0.0, 1.0]], [1.0, 0.0])
    t = mine_triplets(maps(torch.randn(3, 2)), torch.ones(3), memory, k=16, threshold=0.5)
    if case == "fewer_than_k":
        assert t.anchor.numel() == 3     # k clipped to the two rows, both labels present
    else:
        assert t.anchor.numel() == 0


def test_unknown_label_rule_is_rejected():
    with pytest.raises(ValueError, match="label_rule='nearest'"):
        mine_triplets(maps(torch.randn(2, 2)), torch.ones(2), constructed_set(), k=2, label_rule="nearest")


def test_triplet_loss_matches_hand_computation():
    cos_ap, cos_an = torch.tensor([2 ** -0.5]), torch.tensor([0.0])   # d_ap = 0.2929, d_an = 1
    loss, active = triplet_margin_loss(cos_ap, cos_an, margin=0.2)
    assert loss.item() == pytest.approx(0.0) and active.item() == 0.0
    loss, active = triplet_margin_loss(cos_an, cos_ap, margin=0.2)    # swapped: 1 - 0.2929 + 0.2
    assert loss.item() == pytest.approx(1.0 - (1.0 - 2 ** -0.5) + 0.2, abs=1e-6)
    assert active.item() == 1.0


def test_attended_cosine_equals_cosine_of_the_attended_maps():
    torch.manual_seed(0)
    x, y = torch.rand(6, 5, 4, 3), torch.rand(6, 5, 4, 3)
    wx = torch.rand(6, 4, 3, requires_grad=True)
    wy = torch.rand(6, 4, 3, requires_grad=True)
    fast = attended_cosine(x, y, wx, wy)
    slow = torch.nn.functional.cosine_similarity((x * wx.unsqueeze(1)).flatten(1),
                                                 (y * wy.unsqueeze(1)).flatten(1), dim=1)
    assert torch.allclose(fast, slow, atol=1e-6)
    g_fast = torch.autograd.grad(fast.sum(), [wx, wy])
    g_slow = torch.autograd.grad(slow.sum(), [wx, wy])
    for a, b in zip(g_fast, g_slow):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("seed", range(40))
def test_loss_and_gradients_stay_finite_for_random_and_extreme_maps(seed):
    # a property test over random shapes, scales from 0 to 1e30, weights with exact zeros
    g = torch.Generator().manual_seed(seed)
    t, c, h, w = (int(v) for v in torch.randint(1, 6, (4,), generator=g))
    scales = torch.tensor([0.0, 1e-30, 1e-3, 1.0, 1e3, 1e30])
    pick = lambda: scales[torch.randint(0, len(scales), (t, 1, 1, 1), generator=g)]  # noqa: E731
    x, y, z = (torch.rand(t, c, h, w, generator=g) * pick() for _ in range(3))
    weights = [(torch.rand(t, h, w, generator=g) * (torch.rand(t, h, w, generator=g) > 0.3)).requires_grad_(True)
               for _ in range(3)]
    cos_ap = attended_cosine(x, y, weights[0], weights[1])
    cos_an = attended_cosine(x, z, weights[0], weights[2])
    assert torch.isfinite(cos_ap).all() and (cos_ap.abs() <= 1 + 1e-5).all()
    loss, active = triplet_margin_loss(cos_ap, cos_an, margin=0.2)
    assert torch.isfinite(loss) and 0.0 <= active.item() <= 1.0
    loss.backward()
    assert all(torch.isfinite(wt.grad).all() for wt in weights)


def test_above_rule_labels_by_the_threshold_whatever_the_anchor():
    # neighbours of the anchor in order of similarity: returns 0.1 (low), 0.9 (high)
    memory = memory_of([[1.0, 0.1], [1.0, 0.3]], [0.1, 0.9])
    for anchor_return in (0.0, 1.0):
        t = mine_triplets(maps([[1.0, 0.0]]), torch.tensor([anchor_return]), memory, k=2,
                          label_rule="above", threshold=0.5)
        assert (t.positive.tolist(), t.negative.tolist()) == ([1], [0])
    same_side = mine_triplets(maps([[1.0, 0.0]]), torch.tensor([0.0]), memory, k=2, label_rule="threshold",
                              threshold=0.5)
    assert (same_side.positive.tolist(), same_side.negative.tolist()) == ([0], [1])


def test_label_agreement_counts_anchors_labelled_as_their_nearest_neighbour():
    memory = memory_of([[1.0, 0.0], [0.0, 1.0]], [1.0, 0.0])
    anchors = maps([[1.0, 0.1], [1.0, 0.2], [0.1, 1.0], [0.2, 1.0]])
    # nearest neighbours: rows 0, 0, 1, 1 (returns 1, 1, 0, 0); anchors' own labels high, low, low, high
    t = mine_triplets(anchors, torch.tensor([1.0, 0.0, 0.0, 1.0]), memory, k=1, threshold=0.5)
    assert t.label_agreement == pytest.approx(0.5)


def test_glimpse_is_the_cosine_of_the_gaze_weighted_mean_channel_vectors():
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)
    wx, wy = torch.rand(3, 4, 4), torch.rand(3, 4, 4)
    gx = (x * wx[:, None]).sum((2, 3)) / wx.sum((1, 2))[:, None]
    gy = (y * wy[:, None]).sum((2, 3)) / wy.sum((1, 2))[:, None]
    expected = torch.nn.functional.cosine_similarity(gx, gy, dim=1)
    assert torch.allclose(gaze_similarity("glimpse", x, y, wx, wy), expected, atol=1e-6)
    # centred: the mean map is subtracted from both maps first
    m = torch.randn(5, 4, 4)
    assert torch.allclose(gaze_similarity("glimpse", x, y, wx, wy, m), glimpse_cosine(x - m, y - m, wx, wy), atol=1e-6)
    assert torch.allclose(gaze_similarity("centred_map", x, y, wx, wy, m), attended_cosine(x - m, y - m, wx, wy),
                          atol=1e-6)
    assert torch.allclose(gaze_similarity("map", x, y, wx, wy, m), attended_cosine(x, y, wx, wy), atol=1e-6)
    with pytest.raises(ValueError, match="similarity='dot'"):
        gaze_similarity("dot", x, y, wx, wy)


@pytest.mark.parametrize("triplet_gaze", ["anchor", "each"])
def test_gaze_triplet_loss_weighs_all_three_by_the_anchors_gaze_or_each_by_its_own(triplet_gaze):
    torch.manual_seed(0)
    a, p, n = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)

    def gaze(maps):  # weights that depend on the map: a softmax of channel 0 over the cells
        weights = torch.softmax(maps[:, 0].flatten(1), 1).view(-1, 5, 5)
        return weights, weights

    loss, active, cos_ap, cos_an = gaze_triplet_loss(gaze, a, p, n, similarity="map", triplet_gaze=triplet_gaze,
                                                     margin=0.2)
    w_a = gaze(a)[0]
    w_p, w_n = (w_a, w_a) if triplet_gaze == "anchor" else (gaze(p)[0], gaze(n)[0])
    assert torch.allclose(cos_ap, attended_cosine(a, p, w_a, w_p))
    assert torch.allclose(cos_an, attended_cosine(a, n, w_a, w_n))
    expected_loss, expected_active = triplet_margin_loss(cos_ap, cos_an, margin=0.2)
    assert torch.allclose(loss, expected_loss) and torch.equal(active, expected_active)


def test_glimpse_gradient_moves_the_fovea_to_where_positive_and_negative_differ():
    """Hand-made triplets with a known answer: the anchor and positive carry the same feature
    in the left half, the negative a different one there; the right halves are alike in all
    three. With the anchor's gaze on every map, the triplet loss must pull the centre left."""
    from rllib_gaze.gaze import gaussian_map as draw
    h = w = 8
    anchor = torch.zeros(1, 2, h, w)
    anchor[:, 0, :, :4] = 1.0           # left half: channel 0
    anchor[:, 1, :, 4:] = 1.0           # right half: channel 1 in every map
    positive = anchor.clone()
    negative = anchor.clone()
    negative[:, 0, :, :4] = 0.0
    negative[:, 1, :, :4] = 1.0         # left half differs: channel 1 instead of 0
    centre = torch.tensor([[0.3, 0.0, 0.6, 0.6, 0.0]], requires_grad=True)
    weights = draw(centre, h, w, floor=0.0, normalization="peak")
    loss, _ = triplet_margin_loss(glimpse_cosine(anchor, positive, weights, weights),
                                  glimpse_cosine(anchor, negative, weights, weights), margin=0.5)
    loss.backward()
    assert centre.grad[0, 0] > 0        # gradient descent lowers mu_x: the fovea moves left
    assert abs(centre.grad[0, 1]) < 1e-6


def test_glimpse_stays_finite_for_extreme_maps():
    x = torch.full((2, 3, 4, 4), 1e30)
    y = torch.full((2, 3, 4, 4), -1e30)
    w = torch.rand(2, 4, 4, requires_grad=True)
    cos = glimpse_cosine(x, y, w, w)
    cos.sum().backward()
    assert torch.isfinite(cos).all() and torch.isfinite(w.grad).all()


def test_centred_search_ranks_neighbours_by_the_cosine_of_maps_minus_the_mean_map():
    torch.manual_seed(0)
    offset = torch.full((1, 6), 10.0)                         # what every scene shares (background)
    bank = offset + torch.rand(40, 6)
    anchors = offset + torch.rand(8, 6)
    memory = memory_of(bank.tolist(), torch.arange(40.0) % 2)
    mean = memory.filled()[0].mean(0)
    t = mine_triplets(maps(anchors.tolist()), torch.zeros(8), memory, k=1, threshold=0.5, centre=mean,
                      bank_keys=search_keys(memory.filled()[0] - mean))
    centred_nn = torch.nn.functional.normalize(anchors - mean.view(1, -1), dim=1) @ \
        torch.nn.functional.normalize(bank - mean.view(1, -1), dim=1).T
    raw_nn = torch.nn.functional.normalize(anchors, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    expected_agreement = ((centred_nn.argmax(1) % 2) == 0).float().mean().item()
    assert t.label_agreement == pytest.approx(expected_agreement)
    assert not torch.equal(centred_nn.argmax(1), raw_nn.argmax(1))  # the offset decides the raw search


def test_return_to_go_discounts_within_each_chunk_and_bootstraps_at_its_extra_row():
    from rllib_gaze.contrastive import discounted_return_to_go

    # chunk A: rewards 1, 2 then its extra row (V there = 10); chunk B: 3 (terminated), extra row
    rewards = torch.tensor([1.0, 2.0, 0.0, 3.0, 0.0])
    terminated = torch.tensor([False, False, False, True, False])
    mask = torch.tensor([True, True, False, True, False])
    bootstrap = torch.tensor([0.0, 0.0, 10.0, 0.0, 7.0])
    g = discounted_return_to_go(rewards, terminated, mask, bootstrap, gamma=0.5)
    # A: G_1 = 2 + 0.5 * 10 = 7, G_0 = 1 + 0.5 * 7 = 4.5; B: terminated, G = 3 (no bootstrap)
    assert g.tolist() == pytest.approx([4.5, 7.0, 10.0, 3.0, 7.0])


def return_to_go_by_rows(rewards, terminated, mask, bootstrap, gamma):
    """The row-by-row loop the vectorised return-to-go replaced (before issue 22): the reference."""
    following, values = 0.0, []
    for t in range(rewards.shape[0] - 1, -1, -1):
        if not mask[t]:
            following = float(bootstrap[t])
        else:
            following = float(rewards[t]) + (0.0 if terminated[t] else gamma * following)
        values.append(following)
    return torch.tensor(values[::-1])


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_return_to_go_equals_the_row_loop_on_random_chunk_layouts(seed):
    from rllib_gaze.contrastive import discounted_return_to_go

    gen = torch.Generator().manual_seed(seed)
    # chunks of random lengths (1 to 300 steps, so some are longer than the scan's first offsets),
    # each followed by its extra row; some end in a termination, some also terminate inside
    lengths = torch.randint(1, 300, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
    mask = torch.cat([torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)])
                      for n in lengths])
    rewards = torch.randn(mask.shape[0], generator=gen)
    terminated = (torch.rand(mask.shape[0], generator=gen) < 0.02) & mask
    bootstrap = 5.0 * torch.randn(mask.shape[0], generator=gen)
    for gamma in (0.0, 0.5, 0.95, 1.0):
        expected = return_to_go_by_rows(rewards, terminated, mask, bootstrap, gamma)
        got = discounted_return_to_go(rewards, terminated, mask, bootstrap, gamma)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4), (gamma, (got - expected).abs().max())
    # a batch that does not end at an extra row: the rows after the last one count 0
    cut = mask.shape[0] - 1
    assert torch.allclose(discounted_return_to_go(rewards[:cut], terminated[:cut], mask[:cut], bootstrap[:cut], 0.9),
                          return_to_go_by_rows(rewards[:cut], terminated[:cut], mask[:cut], bootstrap[:cut], 0.9),
                          rtol=1e-5, atol=1e-4)


def test_return_to_go_reads_nothing_on_the_host():
    from rllib_gaze.contrastive import discounted_return_to_go
    from rllib_gaze.profiling import OpCounter

    mask = torch.arange(1000) % 51 != 50
    counter = OpCounter()
    with counter:
        discounted_return_to_go(torch.rand(1000), torch.zeros(1000, dtype=torch.bool), mask, torch.randn(1000), 0.9)
    assert counter.sync_count() == 0
    assert sum(counter.ops.values()) < 200   # log2(1000) vector steps, not one per row


@pytest.mark.parametrize("seed", range(3))
def test_fixed_size_mining_agrees_with_the_compacted_triplets(seed):
    gen = torch.Generator().manual_seed(seed)
    memory = FeatureReturnMemory(64, (4, 3, 3), pool=2)
    memory.push(torch.rand(64, 4, 3, 3, generator=gen), torch.randn(64, generator=gen))
    anchors, returns = torch.rand(20, 4, 3, 3, generator=gen), torch.randn(20, generator=gen)
    searched = torch.rand(20, generator=gen) < 0.8
    rows = mine_rows(anchors, returns, memory, k=4, threshold=torch.tensor(0.1), searched=searched)
    compact = mine_triplets(anchors[searched], returns[searched], memory, k=4, threshold=0.1)
    assert torch.equal(rows.valid.nonzero().squeeze(1), searched.nonzero().squeeze(1)[compact.anchor])
    assert torch.equal(rows.positive[rows.valid], compact.positive)
    assert torch.equal(rows.negative[rows.valid], compact.negative)
    assert float(rows.valid_fraction) == pytest.approx(compact.valid_fraction)
    assert float(rows.label_agreement) == pytest.approx(compact.label_agreement)


def test_masked_triplet_and_fixation_losses_equal_the_losses_of_the_valid_rows():
    from rllib_gaze.contrastive import fixation_loss

    torch.manual_seed(0)
    cos_ap, cos_an, valid = torch.rand(10), torch.rand(10), torch.rand(10) < 0.6
    loss, active = triplet_margin_loss(cos_ap, cos_an, margin=0.2, valid=valid)
    expected = triplet_margin_loss(cos_ap[valid], cos_an[valid], margin=0.2)
    assert float(loss) == pytest.approx(float(expected[0])) and float(active) == pytest.approx(float(expected[1]))
    params, centres = torch.rand(10, 5), torch.rand(10, 2)
    assert float(fixation_loss(params, centres, valid)) == pytest.approx(float(fixation_loss(params[valid],
                                                                                              centres[valid])))
    none = torch.zeros(10, dtype=torch.bool)
    assert float(triplet_margin_loss(cos_ap, cos_an, margin=0.2, valid=none)[0]) == 0.0


def test_fixation_search_picks_the_cell_where_positive_and_negative_differ():
    """Anchor and positive share a thing at cell (x=5, y=2) that the negative lacks; elsewhere all
    three hold the same things at different places: the search must name that cell."""
    from rllib_gaze.contrastive import fixation_targets

    def scene(marks):  # marks: [(channel, y, x)]
        m = torch.zeros(1, 4, 8, 8)
        for c, y, x in marks:
            m[0, c, y, x] = 1.0
        return m
    anchor = scene([(0, 2, 5), (1, 6, 1), (2, 0, 0)])
    positive = scene([(0, 4, 4), (1, 1, 7), (2, 7, 7)])      # the same things, elsewhere
    negative = scene([(3, 4, 4), (1, 3, 3), (2, 5, 0)])      # channel 3 where the others have 0
    centres, score = fixation_targets(anchor, positive, negative, pools=(1,))
    assert centres.tolist() == [[(5 + 0.5) / 4 - 1, (2 + 0.5) / 4 - 1]]
    assert score.item() == pytest.approx(1.0)


def test_fixation_search_with_a_wider_window_finds_a_relation_of_two_neighbours():
    """Positive and anchor have channels 0 and 1 side by side, the negative has them apart: no single
    cell tells them apart, the 3 x 3 window around the pair does."""
    from rllib_gaze.contrastive import fixation_targets

    def scene(a, b):
        m = torch.zeros(1, 2, 8, 8)
        m[0, 0, a[0], a[1]] = 1.0
        m[0, 1, b[0], b[1]] = 1.0
        return m
    anchor, positive, negative = scene((3, 3), (3, 4)), scene((6, 1), (6, 2)), scene((1, 1), (6, 6))
    centres, _ = fixation_targets(anchor, positive, negative, pools=(3,))
    x, y = centres[0].tolist()
    assert 2 <= (x + 1) * 4 - 0.5 <= 5 and 2 <= (y + 1) * 4 - 0.5 <= 4   # at the pair, not elsewhere
    with pytest.raises(ValueError, match="pools=\\(2,\\)"):
        fixation_targets(anchor, positive, negative, pools=(2,))


def test_fixation_loss_pulls_the_centre_to_the_fixation_only():
    from rllib_gaze.contrastive import fixation_loss

    params = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]], requires_grad=True)
    loss = fixation_loss(params, torch.tensor([[0.5, -0.25]]))
    assert loss.item() == pytest.approx(0.5 ** 2 + 0.25 ** 2)
    loss.backward()
    assert params.grad[0, 0] < 0 < params.grad[0, 1] and torch.all(params.grad[0, 2:] == 0)


def test_grouped_mining_takes_neighbours_only_from_the_anchors_group():
    """Two scenes (groups); an anchor of scene 0 must get its positive and negative from scene 0 even
    where scene 1 holds closer maps, and a group with one label only gives no triplet."""
    torch.manual_seed(0)
    base = torch.rand(2, 4, 3, 3)
    maps = torch.cat([base[0] + 0.3 * torch.rand(6, 4, 3, 3), base[1] + 0.3 * torch.rand(6, 4, 3, 3)])
    memory = FeatureReturnMemory(12, (4, 3, 3))
    memory.push(maps, torch.tensor([0., 1., 0., 1., 0., 1., 1., 1., 1., 1., 1., 1.]))
    bank_groups = torch.tensor([0] * 6 + [1] * 6)
    anchors = torch.stack([maps[6] + 0.01, maps[0] + 0.01])                # near scene 1's and scene 0's maps
    t = mine_triplets(anchors, torch.tensor([1.0, 1.0]), memory, k=12, threshold=0.5,
                      groups=(torch.tensor([0, 1]), bank_groups))
    # anchor 0 (group 0) lies near scene 1's maps but is mined in scene 0; anchor 1 (group 1) has
    # only high returns in its group: no negative, dropped
    assert t.anchor.tolist() == [0]
    assert bank_groups[t.positive].tolist() == [0] and bank_groups[t.negative].tolist() == [0]


def test_mining_apart_skips_neighbours_within_the_gap():
    """Rows of one episode at steps 0..7; with a gap of 3 the anchor at step 4 may only be mined
    against steps 0, 1 and 7, however similar steps 2-6 are."""
    torch.manual_seed(0)
    rows = torch.rand(8, 4, 3, 3)
    memory = FeatureReturnMemory(8, (4, 3, 3))
    memory.push(rows, torch.tensor([0., 1., 0., 1., 0., 1., 0., 1.]))
    steps = torch.arange(8)
    anchor = rows[4:5] + 0.01
    near = mine_rows(anchor, torch.tensor([1.0]), memory, k=8, threshold=0.5)
    far = mine_rows(anchor, torch.tensor([1.0]), memory, k=8, threshold=0.5,
                    apart=(torch.tensor([4]), steps, 3))
    assert bool(near.valid[0]) and bool(far.valid[0])
    assert {int(far.positive[0]), int(far.negative[0])} <= {0, 1, 7}
    assert int(far.positive[0]) in (1, 7) and int(far.negative[0]) == 0    # labels: odd steps high
    assert {int(near.positive[0]), int(near.negative[0])} != {int(far.positive[0]), int(far.negative[0])}


def test_label_agreement_counts_only_anchors_that_have_a_neighbour():
    """An anchor whose every neighbour is excluded (another group) has no nearest neighbour: it must
    not count as agreeing or disagreeing (it read the excluded row's label before)."""
    memory = FeatureReturnMemory(4, (2, 2, 2))
    maps = torch.rand(4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    memory.push(maps, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    anchors, returns = maps[[0, 2]] + 0.01, torch.tensor([1.0, 1.0])
    groups = (torch.tensor([0, 9]), torch.tensor([0, 0, 0, 0]))          # anchor 1's group has no rows
    rows = mine_rows(anchors, returns, memory, k=4, threshold=0.5, groups=groups)
    assert rows.label_agreement.item() == 1.0                            # anchor 0 agrees with row 0
    none = mine_rows(anchors, returns, memory, k=4, threshold=0.5, groups=(torch.tensor([9, 9]), groups[1]))
    assert torch.isnan(none.label_agreement)


def test_chunk_steps_number_the_chunks_and_their_steps_in_rllibs_layout():
    # two chunks of 3 and 2 steps, each closed by RLlib's extra (loss-masked) row
    mask = torch.tensor([True, True, True, False, True, True, False])
    chunk, step = chunk_steps(~mask)
    assert chunk.tolist() == [0, 0, 0, 0, 1, 1, 1] and step.tolist() == [0, 1, 2, 3, 0, 1, 2]


def test_window_vote_finds_the_window_whose_look_alikes_share_the_label():
    """Scenes differ (clutter anywhere); a marker's channel at one place says the label: the window
    on the marker votes with its label wherever the marker is, so it wins, in scenes never seen."""
    gen = torch.Generator().manual_seed(0)

    def scenes(n):
        maps = 0.3 * torch.rand(n, 6, 6, 6, generator=gen)                      # clutter everywhere
        high = torch.rand(n, generator=gen) < 0.5
        cell = torch.randint(36, (n,), generator=gen)
        rows = torch.arange(n)
        flat = maps.view(n, 6, 36)
        flat[rows, 0, cell] += 1.0                                              # the marker
        flat[rows, 1, cell] += high.float()                                     # its state: the label
        flat[rows, 2, cell] += (~high).float()
        return maps - maps.mean((0, 2, 3), keepdim=True), high, cell

    bank, bank_high, _ = scenes(200)
    anchor, anchor_high, cell = scenes(20)
    centres, score = window_vote_targets(anchor, anchor_high, bank, bank_high, k=16, pool=1)
    ys, xs = cell_centres(6, 6)
    assert torch.allclose(centres, torch.stack([xs[cell % 6], ys[cell // 6]], 1))
    assert (score > 0.9).all()
