"""The sampler stage: R1-style traces for each problem, streamed to JSONL as they finish.

    exit-loop generate --model_name Qwen/Qwen2.5-32B-Instruct --num_examples 100 --num_samples 4

    from exit_loop.sample import SampleConfig, sample, start_backend
    sampled = sample(SampleConfig(model_name=path, num_samples=4), problems, "samples.jsonl")

Three backends behind one interface (`generate(requests, on_done, cfg)`, `tokenizer()`, `close()`):
`vllm` (`exit_loop.sample.vllm`: the offline `LLM` engine, each request's samples written the
moment it finishes), `hf` (`exit_loop.sample.hf`: transformers, batched, left padding,
length-sorted; on a GPU through the CUDA-graph decoder of `exit_loop.sample.graph`) and `server`
(`exit_loop.sample.server`: an OpenAI-compatible server, for teachers too big for an engine in
this process). `auto` uses vLLM and falls back to HF, with a warning that says why, when vLLM
cannot be imported or its engine fails to start. `exit_loop.sample.request` holds what they share (`SampleConfig`,
`Request`, `Completion`).

Resume: the samples file is append-only; on start, rows already there are read back (a line torn
by a crash is dropped) and only the missing (problem, sample) pairs are generated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from exit_loop.console import say, stream
from exit_loop.jsonl import AppendLog
from exit_loop.prompts import hinted_question, normalise_response, student_prompt, teacher_messages, teacher_prompt
from exit_loop.sample.hf import HFBackend
from exit_loop.sample.request import (Completion, LaunchConfig, Request, SampleConfig, ServerConfig,
                                      check_model_path, check_sampling_keys, launch_address, pending_requests,
                                      resolve_prompt_style, select_shard)
from exit_loop.sample.server import ServerBackend, ServerError
from exit_loop.sample.vllm import VLLMBackend
from exit_loop.tasks import Problem
from exit_loop.tokens import count_tokens

log = logging.getLogger(__name__)

__all__ = ["HFBackend", "LaunchConfig", "SampleConfig", "Sampled", "SamplerBackend", "ServerBackend", "ServerConfig",
           "ServerError", "VLLMBackend", "check_model_path", "check_sampling_keys", "generated_tokens",
           "launch_address", "resolve_prompt_style", "sample", "select_shard", "start_backend"]

SamplerBackend = VLLMBackend | HFBackend | ServerBackend


def start_backend(cfg: SampleConfig) -> SamplerBackend:
    """Start the configured backend; `auto` tries vLLM first and says why it falls back."""
    if cfg.backend == "hf":
        return HFBackend(cfg)
    if cfg.backend == "server":
        return ServerBackend(cfg)
    if cfg.backend == "vllm":
        return VLLMBackend(cfg)
    try:
        return VLLMBackend(cfg)
    except Exception as e:  # noqa: BLE001 - any failure to start vLLM means: use HF
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:500]  # all lines: the first may not say which
        log.warning("vLLM unavailable (%s); falling back to the HF backend", reason)
        return HFBackend(cfg)


def sample_row(cfg: SampleConfig, req: Request, k: int, c: Completion, backend: str,
               student_tok: Any) -> dict[str, Any]:
    """One stored sample. `num_tokens` counts the stored response in the student's tokens (what
    SFT trains on, EOS not included); a teacher's own count of what it generated is kept apart
    as `teacher_num_tokens`."""
    norm = normalise_response(c.text, cfg.prompt_style)
    row: dict[str, Any] = {
        "problem_id": req.problem.id,
        "sample_index": k,
        "prompt": student_prompt(req.problem.question),
        "response": norm.response,
        "ground_truth": req.problem.ground_truth,
        "question": req.problem.question,
        "model": cfg.model_name,
        "round": cfg.round,
        "backend": backend,
        "prompt_style": cfg.prompt_style,
        "num_tokens": count_tokens(student_tok, norm.response),
        "finish_reason": c.finish_reason,
    }
    if req.problem.group is not None:
        row["group"] = req.problem.group  # the data set's group of the question (data.group_by)
    if req.problem.groups:
        row["groups"] = dict(req.problem.groups)  # and its further groupings (group_by's other keys)
    if cfg.hint:
        row["hinted"] = True  # drawn with the answer in the prompt: not sampled in this row's context
    if cfg.student is not None:
        row["teacher_num_tokens"] = c.num_tokens
    elif c.prompt_tokens is not None and cfg.prompt_style == "r1_zero" and not cfg.hint:
        row["prompt_tokens"] = c.prompt_tokens  # the student's own context: SFT checks it is the same
    if cfg.prompt_style != "r1_zero":
        row["raw_output"] = c.text
    return row


def asked(problem: Problem, cfg: SampleConfig) -> str:
    """The question as the sampler puts it: with its answer as a hint under `cfg.hint`."""
    return hinted_question(problem.question, problem.ground_truth) if cfg.hint else problem.question


def generated_tokens(row: dict[str, Any]) -> int:
    """The tokens the sampler generated for a stored row (the teacher's count where it was one)."""
    return row.get("teacher_num_tokens", row.get("num_tokens", 0))


def load_tokenizer(model: str, cfg: SampleConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, trust_remote_code=cfg.trust_remote_code)


@dataclass(frozen=True)
class Sampled:
    """What a `sample` call leaves in its file: every row there, old and new."""
    path: Path
    samples: int
    tokens: int


def sample(cfg: SampleConfig, problems: Sequence[Problem], out_path: str | Path,
           backend: SamplerBackend | None = None, summary: bool = True) -> Sampled:
    """Sample `cfg.num_samples` traces for each problem of this shard into `out_path` (JSONL),
    resuming from what is there (the file exists afterwards, empty if there was nothing to do).
    Returns the path with the file's sample and token counts, so no caller reads it back.
    `summary`: end with a line on the console (off where the caller prints its own)."""
    from tqdm.auto import tqdm

    if cfg.prompt_style == "auto":
        cfg = replace(cfg, prompt_style=resolve_prompt_style(cfg.model_name))
    out_path = Path(out_path)
    problems = select_shard(problems, cfg.num_shards, cfg.shard_id)
    with AppendLog(out_path) as sink:
        done = {(r["problem_id"], r["sample_index"]) for r in sink.rows}
        counts = [len(sink.rows), sum(generated_tokens(r) for r in sink.rows)]
        total = len(problems) * cfg.num_samples
        todo_problems = [p for p in problems if any((p.id, k) not in done for k in range(cfg.num_samples))]
        if not todo_problems:
            if problems and summary:
                say(f"sample: {out_path} already complete ({len(done)} samples)")
            return Sampled(out_path, *counts)
        owned = backend is None
        backend = backend or start_backend(cfg)
        style, system = cfg.prompt_style, cfg.system_prompt
        chat_turns = isinstance(backend, ServerBackend) and backend.endpoint == "chat"  # the server's template
        tok = backend.tokenizer() if style != "r1_zero" and not chat_turns else None
        student_tok = backend.tokenizer() if cfg.student is None else load_tokenizer(cfg.student, cfg)
        requests = pending_requests(todo_problems, done, cfg.num_samples,
                                    lambda p: "" if chat_turns else teacher_prompt(asked(p, cfg), style, tok, system))
        for r in requests if chat_turns else []:
            r.messages = teacher_messages(asked(r.problem, cfg), style, system)
        bar = tqdm(total=total, initial=len(done), desc=f"sample ({backend.name})", unit="sample",
                   dynamic_ncols=True, mininterval=1.0, file=stream())
        last_sync = time.monotonic()

        def on_done(req: Request, comps: list[Completion]) -> None:
            nonlocal last_sync
            sink.write(sample_row(cfg, req, k, c, backend.name, student_tok)
                       for k, c in zip(req.sample_indices, comps))
            counts[0] += len(comps)
            counts[1] += sum(c.num_tokens for c in comps)
            bar.update(len(comps))
            if time.monotonic() - last_sync > 5.0:
                sink.sync()
                last_sync = time.monotonic()

        t0 = time.monotonic()
        try:
            backend.generate(requests, on_done, cfg)
        finally:
            if owned:
                backend.close()
        bar.close()
        n_new = sum(len(r.sample_indices) for r in requests)
        dt = time.monotonic() - t0
        if summary:
            say(f"sample: {n_new} new samples in {dt:.1f}s ({n_new / max(dt, 1e-9):.1f} samples/s) "
                f"-> {out_path}")
    return Sampled(out_path, *counts)
