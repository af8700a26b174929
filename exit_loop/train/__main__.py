"""`python -m exit_loop.train ARGS`: the SFT stage's command, `exit-loop train ARGS`."""

import sys

from exit_loop.train.core import command

sys.exit(command(sys.argv[1:]))
