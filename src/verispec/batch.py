"""Batched speculative decoding with continuous batching: B sequences advance together, one target forward a round.

Each sequence keeps its own state — target KV cache, drafter (and the drafter's cache), draft-length policy,
verifier, RNG stream and statistics — and its own draft length and accepted length (ragged acceptance). A round:
1. sequences that joined since the last round are prefilled (one ragged forward for all of them);
2. every running sequence proposes; drafters of one class propose together (`Drafter.propose_batch`: the draft
   model's steps share one ragged forward, n-gram lookups just loop);
3. the target scores every sequence's pending token and draft nodes in **one ragged forward**
   (`verispec.cache.score_batch`): the rows of all sequences stacked for the linear layers, attention per sequence
   over its own cache — no padding, so no compute is spent on pad rows and no mask is shared between sequences;
4. each sequence is verified and committed exactly as the solo engine does it (`verispec.engine.settle`), its
   caches cropped to its own committed tokens;
5. finished sequences leave; waiting ones join at the next round (up to `max_batch` running).

Prefix caching: on a row-exact target (gguf), a joining prompt that starts with tokens another stream's cache
already holds copies those KV entries instead of computing them (`BatchEngine._share_prefixes`): exact, because
there a position's entries depend on its prefix only.

Why ragged rather than padded: a padded (B, T_max) batch spends T_max − T_i rows of every linear on padding
(drafts differ in length every round) and needs a (B, T, P_max) mask over caches of different lengths; the
ragged layout feeds exactly Σ T_i rows. On the gguf backend each row is computed by per-row code, so a sequence's
logits are bit-identical to its solo run whatever shares the forward: greedy output equals the solo run token
for token, and each sequence's sampled output has the target's distribution (each draws from its own
`torch.Generator` seeded by its request). On other backends the target's rounding would depend on the other
rows, so `score_batch` runs their sequences one by one (correct, but no batching gain).

Vocabulary after vLLM (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention": continuous batching, iteration-level scheduling as in Orca, Yu et al. 2022).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from verispec.cache import CachedLM, prefill_batch, score_batch
from verispec.engine import feed_features, finish, settle
from verispec.sampling import Sampling
from verispec.types import GenerationStats


@dataclass
class Request:
    """One generation: a prompt (text or token ids) and how to continue it.

    method / gamma / policy / options: per-request choices (None = the engine's). on_tokens(stream, new_ids) is
    called in the engine's thread after every round that committed tokens; returning False ends the stream
    ("stop": e.g. a stop string matched, or the client went away)."""

    prompt: str | list[int]
    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)
    method: str | None = None
    gamma: int | None = None
    policy: str | None = None
    options: dict = field(default_factory=dict)
    stop_ids: frozenset[int] | None = None  # None = the target's stop tokens
    on_tokens: Callable[["Stream", list[int]], bool] | None = None


@dataclass
class Stream:
    """A request's state inside the engine."""

    id: int
    request: Request
    prompt_ids: list[int]
    method: str
    lm: CachedLM
    drafter: object
    policy: object
    verifier: object
    generator: torch.Generator
    stop_ids: frozenset[int]
    stats: GenerationStats
    tokens: list[int] = field(default_factory=list)
    state: str = "waiting"  # waiting -> running -> done
    finish_reason: str | None = None  # "length", "stop" (stop token / on_tokens said so), "cancelled", "error"
    error: str | None = None
    t_submit: float = 0.0
    t_first_token: float | None = None
    t_done: float | None = None
    _t_start: float = 0.0
    _cancel: bool = False

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_ids):]

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def started(self) -> bool:
        """Whether it ever ran (was prefilled): a stream cancelled while waiting never did."""
        return self._t_start > 0


class BatchEngine:
    """Serve many generations at once on one loaded target (and drafter), each lossless on its own.

    target / drafter: names, paths or loaded models (as `verispec.generate` takes them). method / gamma / policy /
    verifier / options: the defaults for requests that do not choose. max_batch: the most sequences running at
    once; more wait in a queue (its length is `waiting`). Thread-safe: `submit` and `cancel` may be called from
    any thread while one thread calls `step` (the server's worker). Two engines on the same model objects must not
    step at the same time (the native backend grows shared tables, e.g. the rotary one, on first use).
    """

    def __init__(self, target, drafter=None, *, method: str | None = None, gamma: int = 4, policy: str | None = None,
                 verifier: str | None = None, backend: str = "auto", drafter_backend: str | None = None,
                 max_batch: int = 8, **options):
        from verispec.backends import check_target, drafter_backend as default_for_drafter
        from verispec.models.load import load_model
        from verispec.validate import check_int

        self.max_batch = check_int("max_batch", max_batch, 1)
        check_target(backend)
        self.target = load_model(target, backend=backend)
        check_target(self.target.backend)
        self.draft_model = None
        if drafter is not None:
            self.draft_model = load_model(drafter, backend=default_for_drafter(backend, drafter_backend))
        self._paired: set[str] = set()  # methods whose drafter pairing was checked (`_build`; the default's at start)
        self.defaults = dict(method=method or ("sd" if drafter is not None else "ar"), gamma=gamma, policy=policy,
                             verifier=verifier, options=dict(options))
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: deque[Stream] = deque()
        self.running: list[Stream] = []
        self.rounds = 0
        # Validate the defaults once, now, so a bad --method fails at start-up rather than on the first request.
        self._build(Request([0], 1))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def context(self) -> int | None:
        return getattr(self.target.model.config, "max_position_embeddings", None)

    def _build(self, request: Request) -> tuple:
        from verispec.api import _Ctx, resolve_policy
        from verispec.registry import method as method_record, verifier as verifier_record

        d = self.defaults
        m = method_record(request.method or d["method"])
        if m.kind != "speculative":
            raise ValueError(f"method {m.name!r} is a {m.kind}: the batched engine serves speculative methods "
                             f"(ar, sd, pld, ...)")
        if m.needs_draft_model and self.draft_model is None:
            raise ValueError(f"method {m.name!r} needs a drafter model; this engine has none")
        if m.needs_draft_model and m.name not in self._paired:
            from verispec.api import check_pair

            check_pair([m], self.target, self.draft_model)  # same vocabulary, or both tokenizers for uag
            self._paired.add(m.name)
        options = dict(d["options"]) if request.method in (None, d["method"]) else {}
        options.update(request.options)
        gamma = request.gamma if request.gamma is not None else d["gamma"]
        policy, options = resolve_policy(m, request.policy or d["policy"], gamma, options)
        verifier = verifier_record(d["verifier"] or "rejection").load()()
        stop_ids = request.stop_ids if request.stop_ids is not None else self.target.stop_ids
        drafter = m.load()(_Ctx(self.target, self.draft_model if m.needs_draft_model else None, stop_ids, options))
        return m.name, drafter, policy, verifier, stop_ids

    def submit(self, request: Request) -> Stream:
        """Validate a request and queue it; errors (empty or overlong prompt, bad options) raise ValueError here,
        before anything is queued."""
        from verispec.api import _check_length, encode_prompt

        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {request.max_new_tokens!r}")
        prompt_ids = encode_prompt(self.target, request.prompt)
        _check_length(self.target, len(prompt_ids), request.max_new_tokens)
        name, drafter, policy, verifier, stop_ids = self._build(request)
        s = Stream(next(self._ids), request, prompt_ids, name, CachedLM(self.target.model), drafter, policy,
                   verifier, torch.Generator().manual_seed(request.sampling.seed), stop_ids,
                   GenerationStats(method=name, prompt_tokens=len(prompt_ids)), t_submit=time.perf_counter())
        with self._lock:
            self._waiting.append(s)
        return s

    def cancel(self, stream: Stream) -> None:
        """End a stream at the next round boundary (its caches are freed then); a waiting one never starts."""
        stream._cancel = True

    @property
    def idle(self) -> bool:
        return not self.running and not self._waiting

    def step(self) -> list[Stream]:
        """Admit waiting streams, run one round for every running one; return the streams that finished."""
        finished: list[Stream] = []
        with self._lock:
            keep = deque()
            for s in self._waiting:
                (finished if s._cancel else keep).append(s)
            self._waiting = keep
            joining = []
            while self._waiting and len(self.running) + len(joining) < self.max_batch:
                joining.append(self._waiting.popleft())
        for s in finished:
            self._end(s, "cancelled")
        for s in [s for s in self.running if s._cancel]:
            self._end(s, "cancelled")
            finished.append(s)
        self.running = [s for s in self.running if not s.done]
        if joining:
            self._join(joining)
            finished += [s for s in joining if s.done]
            self.running += [s for s in joining if not s.done]
        if self.running:
            finished += self._round(self.running)
            self.running = [s for s in self.running if not s.done]
        return finished

    def _join(self, streams: list[Stream]) -> None:
        """Prefill the target for every joining stream in one forward (a second one for joiners that copy a shared
        prefix from another joiner first), then each drafter class's prefill."""
        for s in streams:
            s.state = "running"
            s._t_start = time.perf_counter()
            s.tokens = list(s.prompt_ids)
            s.policy.start(s.request.sampling, s.lm.vocab_size)
            if s.drafter.target_features:  # a drafter on the target's hidden states: its cache keeps them
                s.lm.track_features(s.drafter.target_features)
            s.lm.reset()
        try:
            followers = self._share_prefixes(streams)
            prefill_batch([s.lm for s in streams if s.id not in followers], [s.tokens[:-1] for s in streams
                                                                             if s.id not in followers])
            for s in streams:  # joiners that share a prompt prefix with an earlier joiner: copy, then the rest
                if s.id in followers:
                    leader, n = followers[s.id]
                    s.lm.adopt_prefix(leader.lm, n)
            prefill_batch([s.lm for s in streams if s.id in followers], [s.tokens[:-1] for s in streams
                                                                         if s.id in followers])
        except Exception as e:  # noqa: BLE001 — a failed forward fails these streams, not the engine
            for s in streams:
                self._end(s, "error", f"prefill failed: {e}")
            return
        for s in streams:
            feed_features(s.lm, s.drafter, s.tokens)
        for group in _by_class(streams):
            try:
                type(group[0].drafter).prefill_batch([s.drafter for s in group], [s.tokens for s in group])
            except Exception as e:  # noqa: BLE001
                for s in group:
                    self._end(s, "error", f"drafter prefill failed: {e}")
        for s in streams:
            s.stats.t_prefill = time.perf_counter() - s._t_start

    MIN_SHARED = 16  # the shortest shared prompt prefix worth copying (a copy is cheap; a 2nd forward is not)

    def _share_prefixes(self, joining: list[Stream]) -> dict[int, tuple[Stream, int]]:
        """Prefix caching on a row-exact target: a joiner whose prompt starts with tokens a running stream's cache
        holds adopts those KV entries now; a joiner sharing a prefix with an earlier joiner is returned as its
        follower {id: (leader, shared length)}, to copy from it once the leader is prefilled. (Skeleton-of-Thought's
        point requests, chat turns with one system prompt.) The copies are bit-identical to a prefill, so outputs
        do not change; only the prompt tokens fed do."""
        if not joining or not joining[0].lm.row_exact:
            return {}
        running = [r for r in self.running if r.lm.cache is not None and r.lm.tree is None]
        followers: dict[int, tuple[Stream, int]] = {}
        leaders: list[Stream] = []
        for s in joining:
            want = s.tokens[:-1]
            best, n = max(((r, _common(r.lm.ids, want)) for r in running if _same_tap(r.lm, s.lm)),
                          key=lambda x: x[1], default=(None, 0))
            if n >= self.MIN_SHARED:
                s.lm.adopt_prefix(best.lm, n)
                continue
            lead, m = max(((r, _common(r.tokens[:-1], want)) for r in leaders if _same_tap(r.lm, s.lm)),
                          key=lambda x: x[1], default=(None, 0))
            if m >= self.MIN_SHARED:
                followers[s.id] = (lead, m)
            else:
                leaders.append(s)
        return followers

    def _round(self, streams: list[Stream]) -> list[Stream]:
        t0 = time.perf_counter()
        budgets = {s.id: s.request.max_new_tokens - len(s.output_ids) for s in streams}
        drafts = {}
        for group in _by_class(streams):
            try:
                out = type(group[0].drafter).propose_batch(
                    [s.drafter for s in group], [s.tokens for s in group],
                    [min(s.policy.next_gamma(), budgets[s.id] - 1) for s in group], [s.policy for s in group],
                    [s.request.sampling for s in group], [s.generator for s in group])
                drafts.update((s.id, d) for s, d in zip(group, out))
            except Exception as e:  # noqa: BLE001 — one method's failure ends its streams only
                for s in group:
                    self._end(s, "error", f"drafting failed: {e}")
        live = [s for s in streams if not s.done]
        t1 = time.perf_counter()
        try:
            logits = score_batch([s.lm for s in live], [s.tokens for s in live], [drafts[s.id] for s in live])
        except Exception as e:  # noqa: BLE001
            for s in live:
                self._end(s, "error", f"target forward failed: {e}")
            return list(streams)
        self.rounds += 1
        for s, l in zip(live, logits):
            try:
                n_before = len(s.tokens)
                hit = settle(s.lm, s.drafter, s.verifier, s.policy, s.tokens, drafts[s.id], l, budgets[s.id],
                             s.request.sampling, s.stop_ids, s.generator, s.stats, t0, t1)
                new = s.tokens[n_before:]
                if new and s.t_first_token is None:
                    s.t_first_token = time.perf_counter()
                go_on = s.request.on_tokens(s, new) if (new and s.request.on_tokens is not None) else True
            except Exception as e:  # noqa: BLE001
                self._end(s, "error", f"{type(e).__name__}: {e}")
                continue
            if s._cancel:  # cancelled while this round ran (a client that left): say so, not "stop"
                self._end(s, "cancelled")
            elif hit or go_on is False:
                self._end(s, "stop")
            elif len(s.output_ids) >= s.request.max_new_tokens:
                self._end(s, "length")
        return [s for s in streams if s.done]

    def _end(self, s: Stream, reason: str, error: str | None = None) -> None:
        if s.done:
            return
        s.state, s.finish_reason, s.error = "done", reason, error
        s.t_done = time.perf_counter()
        if s._t_start:
            finish(s.stats, s.lm, s.drafter, len(s.prompt_ids), max(len(s.tokens), len(s.prompt_ids)),
                   {"length": "max_new_tokens", "stop": "stop_token"}.get(reason, reason), s._t_start)
        s.lm.cache = None  # free the KV entries now (the drafter's with it: the stream is dropped)
        lm = getattr(s.drafter, "lm", None)
        if lm is not None:
            lm.cache = None

    def run(self, requests: list[Request]) -> list[Stream]:
        """Submit every request and step until all are done (continuous batching: a finished stream's slot goes
        to the next waiting one). Returns the streams in request order."""
        streams = [self.submit(r) for r in requests]
        while not all(s.done for s in streams):
            self.step()
        return streams


def _same_tap(donor: CachedLM, lm: CachedLM) -> bool:
    """A joiner whose drafter reads target features copies a prefix only from a cache that has the same ones."""
    return lm.tap is None or (donor.tap is not None and donor.tap.spec == lm.tap.spec)


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _by_class(streams: list[Stream]) -> list[list[Stream]]:
    groups: dict[type, list[Stream]] = {}
    for s in streams:
        groups.setdefault(type(s.drafter), []).append(s)
    return list(groups.values())
