"""Imported only by the math pool's forkserver (see `exit_loop.tasks.math_pool`): every worker forked
from it then starts with math-verify imported and its parser warmed up, ready in milliseconds."""

from exit_loop.tasks.math_pool import warm_up

warm_up()
