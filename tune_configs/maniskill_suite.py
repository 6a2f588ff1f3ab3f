"""The comparison suite: plain PPO vs GazePPO arms, tasks x arms x seeds, as one Tune experiment.

    python tune_configs/maniskill_suite.py [--preset smoke|local|paper] [flags]
    ray job submit -- python tune_configs/maniskill_suite.py [flags]

``python tune_configs/maniskill_suite.py --help`` lists the flags; the command is
``rllib_gaze.cli.main`` (the package must be installed: ``scripts/setup.sh`` does it).
"""

from rllib_gaze.cli import main

if __name__ == "__main__":
    main()
