"""The compared arms: name -> the ``.gaze()`` settings (of ``GazePPOConfig``, or ``GazeSACConfig`` for
``SAC_ARMS``) that differ between them.

Everything else is shared between arms. Use as ``config.gaze(**ARMS[arm])``. A leaf module (no
RLlib import), so the report and the suite's command line can name arms cheaply.
"""

# The arms of docs/method.md.
ARMS = {
    "ppo": {"attention": "none", "contrastive": False},                            # plain CNN baseline
    "gaze": {"attention": "foveal", "contrastive": True},                          # the full method
    "gaze-rl": {"attention": "foveal", "contrastive": False},                      # gaze trained by RL only
    "patch": {"attention": "patch", "contrastive": True},                          # free cell weights + contrastive
    "oracle": {"attention": "oracle", "contrastive": False},                       # fovea fixed on the true target
    "centre": {"attention": "centre", "contrastive": False},                       # fovea fixed on the image centre
}
# Arms that need the env to expose the target's position (the diagnostics do; ManiSkill does not).
TARGET_ARMS = ("oracle",)

# The first defaults (before issue 11's measurements), for comparison.
FIRST_DEFAULTS = {"contrastive_similarity": "map", "contrastive_triplet_gaze": "each", "gaze_rl_gradient": True,
                  "gaze_lr": None, "gaze_head_init_std": 1e-3, "gaze_normalization": "peak"}
# Ablations of the full method: each turns one of today's defaults back (or to an alternative).
ABLATIONS = {
    "gaze-first": FIRST_DEFAULTS,                                     # every change undone
    "gaze-map": {"contrastive_similarity": "map"},
    "gaze-centred-map": {"contrastive_similarity": "centred_map"},
    "gaze-each": {"contrastive_triplet_gaze": "each"},
    "gaze-rl-grad": {"gaze_rl_gradient": True},
    "gaze-shared-adam": {"gaze_lr": None},
    "gaze-init-small": {"gaze_head_init_std": 1e-3},
    "gaze-peak": {"gaze_normalization": "peak"},
    "gaze-value": {"contrastive_return": "value"},
    "gaze-above": {"label_rule": "above"},
    "gaze-return-to-go": {"contrastive_return": "return_to_go"},
}
ARMS.update({name: {**ARMS["gaze"], **change} for name, change in ABLATIONS.items()})
# Alternatives measured beside the defaults (docs/results.md): the centre as a soft-argmax.
VARIANTS = {
    "gaze-soft-argmax": {**ARMS["gaze"], "gaze_centre": "soft_argmax"},
    "gaze-rl-soft-argmax": {**ARMS["gaze-rl"], "gaze_centre": "soft_argmax"},
    "gaze-centred-search": {**ARMS["gaze"], "mining_centred": True},
    # Ours (issue 21): the centre regressed onto the fixation search's cell (docs/method.md).
    "gaze-fixation": {**ARMS["gaze"], "contrastive_objective": "fixation"},
    "gaze-fixation-triplet": {**ARMS["gaze"], "contrastive_objective": "fixation+triplet"},
    # Ours (issue 28): the fixation search on neighbours from the anchor's own episode, the setting
    # in which the mechanism bench first localised on still clutter.
    "gaze-fixation-episode": {**ARMS["gaze"], "contrastive_objective": "fixation", "mining": "episode"},
    # Ours, not the paper's: the gaze trained to predict the return (docs/method.md).
    "gaze-predict": {"attention": "foveal", "contrastive": False, "gaze_predict_coeff": 1.0,
                     "gaze_centre": "soft_argmax"},
}
ARMS.update(VARIANTS)
# The augmentation baselines (issue 30): DrAC for PPO (Raileanu et al. 2021), and the gaze with it.
AUGMENTED = {
    "drac": {**ARMS["ppo"], "augmentation": "shift"},                              # plain CNN + DrAC
    "gaze-drac": {**ARMS["gaze"], "augmentation": "shift"},                        # the full method + DrAC
}
ARMS.update(AUGMENTED)

# GazeSAC's arms (docs/method.md, "GazeSAC"): the same switches on RLlib's SAC. An arm's name says
# its algorithm; one suite experiment runs the arms of one algorithm (``--algo``).
SAC_ARMS = {
    "sac": dict(ARMS["ppo"]),                                                      # plain SAC baseline
    "gaze-sac": dict(ARMS["gaze"]),                                                # the full method on SAC
    # Ours (issue 21): the head reads the map minus the memory's mean map (docs/results.md, GazeSAC probes)
    "gaze-sac-centred": {**ARMS["gaze"], "gaze_input": "centred"},
    # The augmentation baseline for SAC (issue 30): DrQ-v2's random shift (Yarats et al. 2021), and the gaze with it.
    "drq-sac": {**ARMS["ppo"], "augmentation": "shift"},
    "gaze-drq-sac": {**ARMS["gaze"], "augmentation": "shift"},
}
ARMS.update(SAC_ARMS)
# Algorithm -> its arms; and the arm every other arm of that algorithm is compared with.
ALGORITHMS = {"ppo": tuple(arm for arm in ARMS if arm not in SAC_ARMS), "sac": tuple(SAC_ARMS)}
BASELINES = {"ppo": "ppo", "sac": "sac"}


def algorithm(arm: str) -> str:
    """``"sac"`` for the arms of ``SAC_ARMS``, else ``"ppo"``."""
    return "sac" if arm in SAC_ARMS else "ppo"
