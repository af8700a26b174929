"""The checks an ExIt run passes before any GPU works or any job is queued (`preflight`): one
function, so `exit-loop run` (exit_loop.pipeline.loop) and `exit-loop slurm submit`
(exit_loop.pipeline.slurm) run the same checks in the same order.

    run = preflight(cfg, allow_config_change=False, allow_overlap=False)
"""

from __future__ import annotations

import logging

from exit_loop.errors import ConfigError
from exit_loop.hub import check_hub
from exit_loop.pipeline.run import (ExperimentConfig, Run, check_config_change, policy_warnings, resolve_styles,
                                    seed_students, training_problems)
from exit_loop.pipeline.stages import hub_settings
from exit_loop.sample import check_model_path
from exit_loop.tasks import check_overlap, load_problems
from exit_loop.train.grpo import check_grpo_keys

log = logging.getLogger(__name__)


def preflight(cfg: ExperimentConfig, allow_config_change: bool = False, allow_overlap: bool = False,
              hub: bool = True) -> Run:
    """Fix the run's prompt styles (`resolve_styles`), warn of policy combinations that rarely do
    what was meant, then fail now rather than in a stage: no token or no hub where a setting needs
    it (`hub`: False for a dry run, which only prints), a model path that is not there, a bad or
    empty data set or held-out questions that also train (`allow_overlap`: neither checked, the data
    not loaded; a bad data set then fails in the stage that reads it), a config other than the one
    the run was made with (unless `allow_config_change`). Returns the run (its first seed;
    `Run.every_seed` gives them all)."""
    resolve_styles(cfg)
    if any(a.kind == "grpo" for a in cfg.arms.values()):
        if cfg.train.use_chat_template:
            raise ConfigError("a grpo arm samples with the r1_zero prompt; train.use_chat_template is for sft arms only")
        check_grpo_keys(cfg.train.grpo)  # before any stage: unknown train.grpo keys
    for warning in policy_warnings(cfg):
        log.warning("run: %s", warning)
    if hub:
        check_hub(hub_settings(cfg))
    for student in seed_students(cfg):
        check_model_path(student)
    if cfg.teacher:
        check_model_path(cfg.teacher.model)
    if not allow_overlap:
        check_overlap(training_problems(cfg), load_problems(cfg.eval.data))
    run = Run(cfg)
    check_config_change(run, allow_config_change)
    return run
