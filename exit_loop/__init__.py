"""exit-loop: expert iteration for LLM reasoning (sample, verify, filter, SFT, repeat).

Layered one way down: `exit_loop.pipeline` (orchestration) imports the stages (`sample`, `verify`,
`filter`, `train`, `evaluate`, `baseline`, `report`), which import `tasks` and the primitives
(`prompts`, `config`, `jsonl`, `errors`); `exit_loop.cli` dispatches the `exit-loop` command.
"""

__version__ = "0.1.0"
