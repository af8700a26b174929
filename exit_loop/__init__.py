"""exit-loop: expert iteration for LLM reasoning (sample, verify, filter, SFT, repeat)."""

__version__ = "0.1.0"
