"""Orchestration: what runs the stages, in order, on one machine or on SLURM. It imports the stages
and everything below them; nothing below imports it.

- `run`: an ExIt run on disk (`ExperimentConfig`, `Run`, shard paths, the stage command)
- `stages`: rollout (eval + sample), merge, verify, filter, train, for a run and for a generation
- `loop`: `exit-loop run` and `exit-loop stage`, round after round
- `generate`: `exit-loop generate` and `exit-loop merge`, the one-round case of the same stages
- `slurm`: `exit-loop slurm`, the same stages as sbatch jobs (`resources`: the `slurm:` section)
- `quickstart`: `exit-loop quickstart`, the offline demo
"""
