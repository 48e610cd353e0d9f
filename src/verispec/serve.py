"""`verispec serve`: an OpenAI-compatible HTTP server on the batched engine (`verispec.batch.BatchEngine`).

Endpoints, after the OpenAI API reference (https://platform.openai.com/docs/api-reference): `POST /v1/completions`,
`POST /v1/chat/completions` (both with `stream: true` as server-sent events, `data: {json}\\n\\n` chunks ending with
`data: [DONE]\\n\\n`), `GET /v1/models`, plus `GET /health` and `GET /metrics` (Prometheus text exposition).
Errors are OpenAI error objects, `{"error": {"message", "type", "param", "code"}}`, with OpenAI's status codes
(400 bad request, 401 bad key, 404 unknown model, 429 queue full, 500 the engine failed this request, 503 shutting
down). Extensions: `top_k`, and a per-request `verispec: {"method", "gamma", "policy", "options"}` object; every
response carries the request's speculative-decoding metrics under `verispec`.

Metric names follow vLLM's (`vllm:spec_decode_num_drafts`, `vllm:spec_decode_num_draft_tokens`,
`vllm:spec_decode_num_accepted_tokens`, `vllm:spec_decode_num_accepted_tokens_per_pos`, `vllm:request_success`,
`vllm:e2e_request_latency_seconds`, ... — docs.vllm.ai, "Production Metrics" and "Speculative Decoding") with the
prefix `verispec:`. prometheus-client exposes a counter named `verispec:x` as the sample `verispec:x_total` (plus a
`verispec:x_created` timestamp gauge), colons kept, as vLLM's counters appear. Per request (the `verispec` field):
`num_drafts` = rounds that drafted at least one token, `num_draft_tokens`, `num_accepted_draft_tokens`,
`mean_acceptance_length` = 1 + accepted / num_drafts (vLLM's definition: tokens a drafting round yields),
`draft_acceptance_rate` = accepted / draft tokens, `acceptance_by_position` = accepted counts per draft position.

Threads: one worker thread owns the engine and is the only caller of `engine.step()` (the engine's rounds are
synchronous compute; running them on the event loop would stall every connection). Request handlers run on the
event loop and only call `engine.submit` / `engine.cancel`, which the engine makes thread-safe. Tokens travel back
through `Request.on_tokens`, called in the worker after each round: the job decodes its text there (so a stop
string ends the stream in the very round that produced it) and hands the new text to its handler with
`loop.call_soon_threadsafe`. Tokenizer calls from both threads share one lock (a Rust tokenizer is not safe to use
from two threads at once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from verispec.batch import BatchEngine, Request, Stream
from verispec.sampling import Sampling

log = logging.getLogger("verispec.serve")

POLL_S = 0.25  # how often a waiting handler checks whether its client went away
MAX_STOP = 4  # OpenAI: "Up to 4 sequences"
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS_WITHOUT_CONTEXT = 1024  # chat's default when the model states no context length


# -- errors --

class ApiError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers={"WWW-Authenticate": "Bearer"} if self.status == 401 else None)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request bodies (unknown fields are ignored, as vLLM does; fields that would change the output distribution
#    or the response's shape in ways not served here are refused in `_refuse_unsupported`) --

class VerispecOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str | None = None
    gamma: int | None = None
    policy: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    verispec: VerispecOptions | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None


def _refuse_unsupported(body: _Common) -> None:
    refused = {"presence_penalty": body.presence_penalty not in (None, 0), "logit_bias": bool(body.logit_bias),
               "frequency_penalty": body.frequency_penalty not in (None, 0),
               "n": body.n not in (None, 1)}
    if isinstance(body, CompletionBody):
        refused.update(echo=bool(body.echo), logprobs=body.logprobs not in (None, 0), suffix=bool(body.suffix),
                       best_of=body.best_of not in (None, 1))
    else:
        refused.update(logprobs=bool(body.logprobs), top_logprobs=bool(body.top_logprobs), tools=bool(body.tools))
    for name, bad in refused.items():
        if bad:
            what = "only n=1 is served" if name == "n" else "not supported by this server"
            raise ApiError(400, f"{name}: {what} (verispec serves the target's exact distribution, one sequence "
                                f"a request)", param=name, code="unsupported_parameter")


# -- metrics --

def request_metrics(stream: Stream) -> dict:
    """The per-request speculative metrics (vLLM's names), from the stream's round statistics."""
    st = stream.stats
    drafts = [s.drafted for s in st.steps]
    num_drafts = sum(1 for d in drafts if d >= 1)
    draft_tokens = sum(drafts)
    accepted = sum(s.accepted for s in st.steps)
    return {
        "method": stream.method,
        "num_drafts": num_drafts,
        "num_draft_tokens": draft_tokens,
        "num_accepted_draft_tokens": accepted,
        "mean_acceptance_length": 1 + accepted / num_drafts if num_drafts else None,
        "draft_acceptance_rate": accepted / draft_tokens if draft_tokens else None,
        "acceptance_by_position": [a for _, a in st.acceptance_by_position()],
        "target_forwards": st.target_forwards,
    }


class _Metrics:
    """The Prometheus series of one app (its own registry, so two apps in one process do not share counts)."""

    def __init__(self, engine: BatchEngine):
        r = self.registry = CollectorRegistry()
        self.num_drafts = Counter("verispec:spec_decode_num_drafts", "Rounds that drafted at least one token",
                                  registry=r)
        self.num_draft_tokens = Counter("verispec:spec_decode_num_draft_tokens", "Draft tokens proposed",
                                        registry=r)
        self.num_accepted = Counter("verispec:spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r)
        self.accepted_per_pos = Counter("verispec:spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted, by position in the draft", ["position"], registry=r)
        self.prompt_tokens = Counter("verispec:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("verispec:generation_tokens", "Tokens generated by finished requests",
                                         registry=r)
        self.request_success = Counter("verispec:request_success", "Finished requests, by finish reason",
                                       ["finish_reason"], registry=r)
        self.e2e = Histogram("verispec:e2e_request_latency_seconds", "Submission to the last token",
                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
                             registry=r)
        self.ttft = Histogram("verispec:time_to_first_token_seconds", "Submission to the first token",
                              buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                       20, 40), registry=r)
        # As vLLM: one observation per round that produced tokens (a speculative round yields several at once).
        self.itl = Histogram("verispec:inter_token_latency_seconds", "Time between rounds that produced tokens",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5),
                             registry=r)
        Gauge("verispec:num_requests_running", "Requests in the running batch", registry=r).set_function(
            lambda: len(engine.running))
        Gauge("verispec:num_requests_waiting", "Requests queued for a slot", registry=r).set_function(
            lambda: engine.waiting)

    def record(self, stream: Stream, finish_reason: str | None = None) -> None:
        m = request_metrics(stream)
        self.num_drafts.inc(m["num_drafts"])
        self.num_draft_tokens.inc(m["num_draft_tokens"])
        self.num_accepted.inc(m["num_accepted_draft_tokens"])
        for i, a in enumerate(m["acceptance_by_position"]):
            self.accepted_per_pos.labels(position=str(i)).inc(a)
        if stream.started:  # a request cancelled while it waited never had its prompt processed
            self.prompt_tokens.inc(len(stream.prompt_ids))
        self.generation_tokens.inc(len(stream.output_ids))
        self.request_success.labels(finish_reason=finish_reason or stream.finish_reason).inc()
        if stream.t_done is not None:
            self.e2e.observe(stream.t_done - stream.t_submit)
        if stream.t_first_token is not None:
            self.ttft.observe(stream.t_first_token - stream.t_submit)


# -- one request's journey --

@dataclass
class _End:
    """What the worker hands a handler when its stream is done."""

    finish_reason: str
    error: str | None
    text: str  # the whole output text (cut before a stop string)
    delta: str  # what a streaming handler has not sent yet
    prompt_tokens: int
    completion_tokens: int
    verispec: dict


def _find_stop(text: str, stops: list[str]) -> int:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters must wait: the longest tail that could begin a stop string, and a trailing
    U+FFFD (a multi-byte character whose bytes are split between tokens decodes as U+FFFD until complete)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    while n < len(text) and text[len(text) - 1 - n] == "\ufffd":
        n += 1
    return n


class _Job:
    """One HTTP request's generation. Its text state lives in the worker thread; the handler reads only its queue."""

    def __init__(self, service: "_Service", loop: asyncio.AbstractEventLoop, *, streaming: bool, stops: list[str]):
        self.service, self.loop, self.streaming, self.stops = service, loop, streaming, stops
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stream: Stream | None = None
        self.text = ""  # decoded output so far (worker thread)
        self.sent = ""  # the text already pushed to a streaming handler (worker thread)
        self.stopped = False  # a stop string matched
        self.gone = False  # the client went away: on_tokens ends the stream
        self.ended = False
        self._t_last: float | None = None

    def push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (the server stopped): nobody is listening
            pass

    def on_tokens(self, stream: Stream, new_ids: list[int]) -> bool:
        """Called by the engine in the worker thread after every round that committed tokens."""
        now = time.perf_counter()
        if self._t_last is not None:
            self.service.metrics.itl.observe(now - self._t_last)
        self._t_last = now
        if self.gone:
            return False
        if not (self.streaming or self.stops):
            return True  # nothing to decode until the end
        text = self.service.decode(stream.output_ids)
        if self.stops:
            i = _find_stop(text, self.stops)
            if i >= 0:
                self.text, self.stopped = text[:i], True
                return False  # the engine ends the stream ("stop"); finish() sends the rest
        self.text = text
        if self.streaming:
            safe = len(text) - _held_back(text, self.stops)
            # Decoding the whole output each round and sending the difference keeps every character right even
            # where a token's text depends on its neighbours; text that changed behind us is held until the end.
            if safe > len(self.sent) and text.startswith(self.sent):
                delta = text[len(self.sent):safe]
                self.sent += delta
                self.push(("text", delta))
        return True

    def finish(self, stream: Stream) -> None:
        """Worker thread: the stream is done; send the handler everything it still needs."""
        if self.stopped:
            text = self.text
        else:
            text = self.service.decode(stream.output_ids)
            i = _find_stop(text, self.stops) if self.stops else -1
            text = text[:i] if i >= 0 else text
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.ended = True
        self.push(("end", _End(stream.finish_reason or "error", stream.error, text, delta, len(stream.prompt_ids),
                               len(stream.output_ids), request_metrics(stream))))

    def fail(self, message: str) -> None:
        """Worker thread: the engine itself failed; end this job with an error."""
        if not self.ended:
            self.ended = True
            n = len(self.stream.prompt_ids) if self.stream is not None else 0
            self.push(("end", _End("error", message, "", "", n, 0, {})))

    def abandon(self) -> None:
        """Handler: the client went away. Cancel now so the slot and the caches are freed at the next round."""
        self.gone = True
        if self.stream is not None:
            self.service.engine.cancel(self.stream)
        self.service.worker.wake()


# -- the worker --

class _Worker:
    """The one thread that calls engine.step(): step while there is work, else sleep until a submission."""

    def __init__(self, service: "_Service"):
        self.service = service
        self._wake = threading.Event()
        self._stopping = False
        self._deadline = float("inf")
        self._paused = False
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="verispec-engine", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        self._wake.set()

    def pause(self) -> None:
        """Stop stepping (requests queue up); for tests and maintenance."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self.wake()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Step until the cancelled streams are gone (or `timeout`), then end the thread."""
        self._deadline = time.monotonic() + timeout
        self._stopping, self._paused = True, False
        self.wake()
        if self.thread is not None:
            self.thread.join(timeout + 5)

    def _run(self) -> None:
        engine = self.service.engine
        while True:
            # Clear before looking at the queue: a submission after this line sets the event again, so the wait
            # below cannot miss it.
            self._wake.clear()
            if self._stopping and (engine.idle or time.monotonic() > self._deadline):
                return
            if engine.idle or (self._paused and not self._stopping):
                self._wake.wait(0.5)
                continue
            try:
                finished = engine.step()
            except Exception as e:  # noqa: BLE001 — the engine failed outside any one stream: fail every job
                log.exception("engine.step failed")
                self.service.fail_all(f"engine failure: {type(e).__name__}: {e}")
                time.sleep(0.05)
                continue
            for s in finished:
                try:
                    self.service.finished(s)
                except Exception:  # noqa: BLE001 — one bad response must not stop the worker
                    log.exception("finishing stream %s failed", s.id)


# -- the service an app wraps --

class _Service:
    def __init__(self, engine: BatchEngine, model_name: str, api_key: str | None, max_queue: int):
        if engine.target.tokenizer is None:
            raise ValueError("serving text needs a tokenizer: the target was loaded without one")
        self.engine, self.model_name, self.api_key, self.max_queue = engine, model_name, api_key, max_queue
        self.tokenizer = engine.target.tokenizer
        self._tok_lock = threading.Lock()
        self._jobs: dict[int, _Job] = {}  # id(Request) -> job (Request is an unhashable dataclass)
        self._jobs_lock = threading.Lock()
        self.metrics = _Metrics(engine)
        self.worker = _Worker(self)
        self.draining = False
        self.created = int(time.time())

    # tokenizer, one thread at a time
    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode(self, text: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_chat(self, messages: list[dict]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"model {self.model_name!r} has no chat template (its tokenizer defines none): use "
                                f"/v1/completions with a prompt instead", param="messages", code="no_chat_template")
        with self._tok_lock:
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 — a template may reject a conversation (roles, order)
                raise ApiError(400, f"the chat template rejected the messages: {e}", param="messages") from e

    @property
    def jobs(self) -> list[_Job]:
        with self._jobs_lock:
            return list(self._jobs.values())

    def start(self, body: _Common, prompt_ids: list[int], max_tokens: int, streaming: bool,
              prompt_param: str) -> _Job:
        """Validate, queue and return the job (on the event loop: check + submit cannot interleave with another
        handler's, so the queue bound holds)."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if not self.worker.alive:
            raise ApiError(503, "the engine worker is not running", type="server_error", code="engine_down")
        if body.model is not None and body.model != self.model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        _refuse_unsupported(body)
        if self.engine.waiting >= self.max_queue:
            raise ApiError(429, f"the queue is full ({self.engine.waiting} requests waiting); retry later",
                           type="rate_limit_error", code="queue_full")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP or any(not isinstance(s, str) or not s for s in stops):
            raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings",
                           param="stop")
        top_k = body.top_k if body.top_k is not None else 0
        try:
            sampling = Sampling(temperature=1.0 if body.temperature is None else body.temperature,
                                top_k=0 if top_k == -1 else top_k,  # -1 = off, as vLLM
                                top_p=1.0 if body.top_p is None else body.top_p,
                                seed=random.getrandbits(63) if body.seed is None else body.seed)
        except ValueError as e:
            raise ApiError(400, str(e), param=str(e).split()[0]) from e
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty: give at least one token of text", param=prompt_param)
        ctx = self.engine.context
        if ctx is not None and len(prompt_ids) + max_tokens > ctx:
            raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                f"model's context of {ctx} tokens", param="max_tokens",
                           code="context_length_exceeded")
        ext = body.verispec or VerispecOptions()
        job = _Job(self, asyncio.get_running_loop(), streaming=streaming, stops=stops)
        req = Request(prompt_ids, max_tokens, sampling, method=ext.method, gamma=ext.gamma, policy=ext.policy,
                      options=dict(ext.options), on_tokens=job.on_tokens)
        # Registered before submit: the worker may finish the stream before submit even returns here.
        with self._jobs_lock:
            self._jobs[id(req)] = job
        try:
            job.stream = self.engine.submit(req)
        except (ValueError, TypeError, KeyError) as e:
            with self._jobs_lock:
                self._jobs.pop(id(req), None)
            raise ApiError(400, str(e).strip("'\""), param="verispec" if body.verispec else None) from e
        except Exception:
            with self._jobs_lock:
                self._jobs.pop(id(req), None)
            raise
        self.worker.wake()
        return job

    def finished(self, stream: Stream) -> None:
        """Worker thread: account the stream, hand its end to its handler."""
        with self._jobs_lock:
            job = self._jobs.pop(id(stream.request), None)
        reason = stream.finish_reason
        if job is not None and job.gone and reason == "stop" and not job.stopped:
            reason = "cancelled"  # on_tokens ended it because the client left (the engine calls that "stop")
        self.metrics.record(stream, reason)
        if job is not None:
            job.finish(stream)

    def fail_all(self, message: str) -> None:
        with self._jobs_lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            if job.stream is not None:
                self.engine.cancel(job.stream)
            job.fail(message)

    def cancel_all(self) -> None:
        """End every stream at the next round; each still gets its final chunk (finish_reason "cancelled")."""
        for job in self.jobs:
            if job.stream is not None:
                self.engine.cancel(job.stream)
        self.worker.wake()

    def drain(self, grace: float) -> None:
        """Shutdown begins (SIGTERM): refuse new requests, let running ones finish for `grace` seconds, then cancel
        them so that every open stream ends with a final chunk and uvicorn can close its connections."""
        self.draining = True
        t = threading.Timer(grace, self.cancel_all)
        t.daemon = True
        t.start()

    def shutdown(self) -> None:
        self.draining = True
        self.cancel_all()
        self.worker.stop()

    # -- waiting on the worker, from a handler --

    async def next_item(self, job: _Job, http: HttpRequest):
        """The job's next queue item, or None when the client disconnected (the job is then abandoned)."""
        while True:
            try:
                return await asyncio.wait_for(job.queue.get(), POLL_S)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    job.abandon()
                    return None

    async def wait_end(self, job: _Job, http: HttpRequest) -> _End | None:
        try:
            while True:
                item = await self.next_item(job, http)
                if item is None or item[0] == "end":
                    return None if item is None else item[1]
        finally:
            if not job.ended:  # the handler was cancelled (e.g. a forced shutdown): free the slot
                job.abandon()


# -- the app --

class _Auth:
    """Bearer-key check for /v1/* as plain ASGI middleware: it answers before the body is read, so a request without
    the key gets 401 whatever its body, and (unlike Starlette's BaseHTTPMiddleware) it leaves streaming responses
    and their disconnect detection alone."""

    def __init__(self, app, service: "_Service"):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        key = self.service.api_key
        if key is not None and scope["type"] == "http" and scope["path"].startswith("/v1"):
            got = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, given = got.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
                await ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                               code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(end: _End) -> dict:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.prompt_tokens + end.completion_tokens}


def _error_500(end: _End) -> JSONResponse:
    return JSONResponse(error_body(f"generation failed: {end.error or 'unknown error'}", "server_error", None,
                                   "engine_error"), status_code=500)


def create_app(engine: BatchEngine, *, model_name: str, api_key: str | None = None, max_queue: int = 64) -> FastAPI:
    """An OpenAI-compatible app serving `engine`. Its lifespan starts the worker thread (the only caller of
    engine.step) and stops it. api_key: if set, /v1/* need `Authorization: Bearer <key>`. max_queue: requests
    waiting for a slot beyond which new ones get 429. `app.state.verispec` is the service (its `worker`, `jobs`,
    `metrics.registry`)."""
    if not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    service = _Service(engine, model_name, api_key, max_queue)

    @asynccontextmanager
    async def lifespan(app):
        service.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.shutdown)

    app = FastAPI(title="verispec", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.verispec = service

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        # FastAPI answers 422; OpenAI (and its clients) expect 400 with one message and the parameter's name.
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
        else:
            param = ".".join(loc) or None
            msg = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}"
            if len(errs) > 1:
                msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return JSONResponse(error_body(msg, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error" if e.status_code < 500 else
                                       "server_error"), status_code=e.status_code)

    app.add_middleware(_Auth, service=service)

    @app.get("/health")
    async def health():
        if not service.worker.alive:
            return JSONResponse({"status": "engine worker stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": service.created,
                                            "owned_by": "verispec"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            ids = list(prompt)  # token ids, as OpenAI allows
            if any(i < 0 or i >= engine.target.vocab_size for i in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {engine.target.vocab_size})", param="prompt")
        else:
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise ApiError(400, "prompt: give one string (a list of several prompts is not served; n=1)",
                                   param="prompt")
                prompt = prompt[0]
            ids = service.encode(prompt) if prompt else []
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        job = service.start(body, ids, max_tokens, body.stream, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return StreamingResponse(_stream(service, job, http, chunk, None, body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        end = await service.wait_end(job, http)
        if end is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        if end.finish_reason == "error":
            return _error_500(end)
        out = chunk(end.text, end.finish_reason)
        out.update(usage=_usage(end), verispec=end.verispec)
        return out

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HttpRequest):
        messages = []
        for m in body.messages:
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):  # content parts: only text is served
                if any(p.get("type") != "text" for p in m.content):
                    raise ApiError(400, "only text content parts are supported", param="messages")
                d["content"] = "".join(str(p.get("text", "")) for p in m.content)
            messages.append(d)
        text = service.render_chat(messages)
        ids = service.encode(text) if text else []
        limit = body.max_completion_tokens or body.max_tokens
        if limit is None:  # chat: until a stop token or the context, as OpenAI
            ctx = engine.context
            limit = max(1, ctx - len(ids)) if ctx is not None else CHAT_MAX_TOKENS_WITHOUT_CONTEXT
        job = service.start(body, ids, limit, body.stream, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None) -> dict:
            delta = {} if text is None else {"content": text}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            first = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]}
            return StreamingResponse(_stream(service, job, http, chunk, first, body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        end = await service.wait_end(job, http)
        if end is None:
            return Response(status_code=499)
        if end.finish_reason == "error":
            return _error_500(end)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": end.text}, "logprobs": None,
                             "finish_reason": end.finish_reason}],
                "usage": _usage(end), "verispec": end.verispec}

    return app


async def _stream(service: _Service, job: _Job, http: HttpRequest, chunk, first: dict | None, body: _Common):
    """The SSE body: text chunks as the worker sends them, a final chunk with finish_reason (and the verispec
    metrics), a usage chunk when asked for, then [DONE]. Leaving early for any reason (the client disconnected,
    the task was cancelled) cancels the stream in the engine, in the `finally`."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def with_usage(c: dict) -> dict:
        if include_usage:
            c["usage"] = None  # as OpenAI: every chunk carries usage, null but in the last
        return c

    try:
        if first is not None:
            yield _sse(with_usage(first))
        while True:
            item = await service.next_item(job, http)
            if item is None:
                return
            kind, val = item
            if kind == "text":
                yield _sse(with_usage(chunk(val, None)))
                continue
            end: _End = val
            if end.finish_reason == "error":
                yield _sse(error_body(f"generation failed: {end.error or 'unknown error'}", "server_error", None,
                                      "engine_error"))
                yield "data: [DONE]\n\n"
                return
            if end.delta:
                yield _sse(with_usage(chunk(end.delta, None)))
            last = with_usage(chunk("" if first is None else None, end.finish_reason))
            last["verispec"] = end.verispec
            yield _sse(last)
            if include_usage:
                u = chunk("", None)
                u["choices"], u["usage"] = [], _usage(end)
                yield _sse(u)
            yield "data: [DONE]\n\n"
            return
    finally:
        if not job.ended:
            job.abandon()


# -- running it --

def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, grace: float = 30.0,
                log_level: str = "info"):
    """A uvicorn server whose SIGTERM / SIGINT handling drains the app first (see `_Service.drain`)."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                app.state.verispec.drain(grace)
            super().handle_exit(sig, frame)

    # uvicorn waits for open connections before the lifespan shutdown; drain() ends every stream after `grace`,
    # and uvicorn's own timeout is the backstop for a connection that still does not close.
    return _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                  timeout_graceful_shutdown=int(grace) + 10))


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, grace: float = 30.0,
        log_level: str = "info") -> None:
    make_server(app, host, port, grace=grace, log_level=log_level).run()
