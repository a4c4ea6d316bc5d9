"""The service object: a `RagModel`, a root folder of indexes to choose from, a micro-batcher and metrics.

Everything an endpoint does is one method here, usable without HTTP: `answer_batch` (retrieve once for a
batch, then generate once), `retrieve_batch`, `index_list`, `swap`. The async methods (`ask`, `stream`,
`retrieve`) queue a request on the micro-batcher, which calls the batch methods on its worker thread.

Hot swap (paper §4.5, knowledge replaced without retraining): an index is named by its folder under the
root, never by a path. A batch reads the active index and retrieves from it under one lock, so a request
that has started finishes on the index it started with, and reports that index's name and manifest hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from latentrag.errors import LatentRagError
from latentrag.generation.interrupt import interruptible
from latentrag.model import Answer, RagModel
from latentrag.rag_types import rag_type
from latentrag.retrieval.index import MANIFEST
from latentrag.retrieval.retriever import RetrievedBatch
from latentrag.retrieval.searcher import Searcher
from latentrag.serving.admission import RETRIEVE_COST, Limits, Rate, request_cost
from latentrag.serving.batcher import Job, MicroBatcher
from latentrag.serving.metrics import Metrics
from latentrag.serving.schemas import AskRequest, RetrieveRequest

TOKEN_ENV = "LATENTRAG_ADMIN_TOKEN"
INDEX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class ServiceError(LatentRagError):
    """A request the service refuses, with the HTTP status that says why (4xx)."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.headers = {"Retry-After": str(retry_after)} if retry_after is not None else None


class Abandoned(Exception):
    """Every client of a batch went away (or the server is stopping): stop decoding for them."""


class ClientLeft(Exception):
    """The client of a request disconnected before its answer: nothing is sent."""


STOP_WAIT_S = 5.0  # after the grace period, how long `stop` waits for the running batch to notice it must stop


@dataclass(frozen=True)
class Settings:
    """A request's resolved decoding settings; requests with equal settings can share a batch."""

    mode: str
    decoding: str
    k: int
    num_beams: int | None
    max_new_tokens: int

    def cost(self, prompt_tokens: int) -> int:
        return request_cost(self.decoding, self.k, self.num_beams, self.max_new_tokens, prompt_tokens)


@dataclass(frozen=True)
class ActiveIndex:
    name: str
    index: Searcher
    manifest_sha256: str

    def ref(self) -> dict:
        return {"name": self.name, "manifest_sha256": self.manifest_sha256}


def manifest_sha256(directory: Path) -> str:
    return hashlib.sha256((Path(directory) / MANIFEST).read_bytes()).hexdigest()


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _passages(answer_passages, probs) -> list[dict]:
    return [{"id": p.id, "title": p.title, "text": p.text, "probability": float(prob)}
            for p, prob in zip(answer_passages, probs, strict=True)]


class TextStream:
    """Token ids decoded as they come, releasing only whole characters: a character that spans several
    byte-level tokens appears once all of them have arrived (decoding each token alone would show U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        """The text this token completes ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent :], len(text)
        return new


class RagService:
    def __init__(self, model: RagModel, indexes_root: str | Path, index_name: str, max_batch: int = 8,
                 max_wait_ms: float = 5.0, admin_token: str | None = None,
                 open_index: Callable[[Path], Searcher] | None = None, limits: Limits | None = None):
        """open_index: the searcher over an index folder (default `loading.open_index`: a `DenseIndex`, refusing
        a sharded folder; pass `functools.partial(open_index, ray=True)` to serve sharded ones with Ray)."""
        self.model = model
        self.limits = limits or Limits()
        if open_index is None:
            from latentrag.loading import open_index
        self.open_index = open_index
        self.root = Path(indexes_root).expanduser()
        if not self.root.is_dir():
            raise LatentRagError(f"indexes root {self.root} is not a folder: give --indexes-root DIR")
        self.admin_token = admin_token if admin_token is not None else os.environ.get(TOKEN_ENV) or None
        self._lock = threading.Lock()  # the active index: read with the retrieval, replaced by a swap
        self.active = self.load_index(index_name)
        model.swap_index(self.active.index)
        self.batcher = MicroBatcher(self._run, max_batch, max_wait_ms)
        self.rate = Rate()
        self.batcher.on_batch = self.rate.observe
        self.metrics = Metrics()
        self.metrics.watch(self.batcher)
        self.ready = False
        self.stopping = False

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.stopping = False
        self.batcher.start()
        self.ready = True

    async def stop(self, wait_s: float = STOP_WAIT_S) -> bool:
        """Refuse new requests, fail the waiting ones (503), stop the running batch at its next decoding step
        and wait at most `wait_s` for it; whether the worker is idle (False: a step is still running)."""
        self.ready, self.stopping = False, True
        stopped = ServiceError("the server is shutting down: retry on another instance or later", 503, 1)
        for job in [*self.batcher.waiting, *self.batcher.running]:
            if not job.gone and not job.future.done():
                job.future.set_exception(stopped)
                job.future.exception()  # retrieved: no "never retrieved" warning if nobody awaits it
                self.metrics.cancelled("shutdown")
            job.abandoned = True
        return await self.batcher.stop(wait_s)

    # ---- admission (docs/serving.md#limits) -----------------------------------------------------------
    def saturation(self) -> str | None:
        """Why the next small request would be refused (queue full, cost budget spent, stopping), else None."""
        if self.stopping:
            return "shutting down"
        if self.batcher.depth >= self.limits.max_queue:
            return f"{self.batcher.depth} requests are waiting (--max-queue {self.limits.max_queue})"
        pending = self.batcher.pending_cost
        if pending + RETRIEVE_COST > self.limits.max_pending_cost:
            return f"the work held costs {pending} (--max-pending-cost {self.limits.max_pending_cost})"
        return None

    def admit(self, cost: int) -> None:
        """Refuse a request the limits do not allow now: 429 (queue full) or 503 (cost budget spent,
        shutting down), both with Retry-After."""
        limits, batcher = self.limits, self.batcher
        if self.stopping:
            self.metrics.rejected("shutting_down")
            raise ServiceError("the server is shutting down: retry on another instance or later", 503, 1)
        if batcher.depth >= limits.max_queue:
            self.metrics.rejected("queue_full")
            raise ServiceError(f"too many requests: {batcher.depth} are waiting (the server queues at most "
                               f"{limits.max_queue}); retry later", 429, self.rate.seconds(batcher.pending_cost))
        pending = batcher.pending_cost
        if pending + cost > limits.max_pending_cost:
            self.metrics.rejected("saturated")
            raise ServiceError(f"the server is saturated: the requests it holds cost {pending} and this one "
                               f"{cost}, over its budget of {limits.max_pending_cost}; retry later",
                               503, self.rate.seconds(pending + cost - limits.max_pending_cost))

    def check_cost(self, settings: Settings) -> int:
        cost = settings.cost(self.limits.prompt_tokens)
        if cost > self.limits.max_cost:
            self.metrics.rejected("cost")
            beams = "" if settings.decoding == "greedy" else f", num_beams {settings.num_beams or 'default'}"
            raise ServiceError(
                f"this request costs {cost} (k {settings.k}{beams}, max_new_tokens {settings.max_new_tokens}, "
                f"decoding {settings.decoding}), over the server's bound of {self.limits.max_cost} per request "
                "(--max-cost; docs/serving.md#limits): lower k, num_beams or max_new_tokens, or decode 'fast' "
                "instead of 'thorough'", 422)
        return cost

    async def result(self, job: Job, left: asyncio.Future | None = None) -> dict:
        """The answer of an admitted request, or: ClientLeft when `left` (the client's disconnect) comes
        first, ServiceError 503 when the request's deadline (--request-timeout) passes. Either way the
        request is dropped: it never runs if it still waits, and its decoding stops once its batch has
        nobody else to answer."""
        remaining = job.enqueued + self.limits.timeout_s - time.perf_counter()
        watched = {job.future} | ({left} if left is not None else set())
        try:
            done, _ = await asyncio.wait(watched, timeout=max(remaining, 0.0), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server stopped waiting for this request (shutdown)
            if not job.future.done():
                job.abandoned = True
                self.metrics.cancelled("shutdown")
            raise
        if job.future in done:
            return job.future.result()
        job.abandoned = True
        if done:
            self.metrics.cancelled("client_left")
            raise ClientLeft
        self.metrics.cancelled("deadline")
        raise ServiceError(f"no answer within the server's deadline of {self.limits.timeout_s:g} s "
                           "(--request-timeout): the request was dropped; retry later or ask for less "
                           "(smaller k, num_beams or max_new_tokens)", 503, self.rate.seconds(self.batcher.pending_cost))

    # ---- settings -----------------------------------------------------------------------------------
    def settings(self, request: AskRequest) -> Settings:
        """Fill the model's defaults in and refuse what the library would refuse, before queueing."""
        config = self.model.config
        mode = request.mode or config.mode
        kind = rag_type(mode)
        decoding = request.decoding or kind.default_decoding
        max_new_tokens = request.max_new_tokens or config.max_new_tokens
        try:
            kind.check_generator(self.model.generator)  # fid with a decoder-only generator
            kind.options(decoding, request.num_beams, {"max_new_tokens": max_new_tokens})
        except LatentRagError as e:
            raise ServiceError(str(e), 422) from e
        try:  # a question too long to leave room for any passage would fail its whole batch
            self.model.generator.check_prompt_budget([request.question])
        except LatentRagError as e:
            raise ServiceError(str(e), 422) from e
        if request.stream and (mode, decoding) != ("token", "greedy"):
            raise ServiceError(f"streaming needs mode 'token' with decoding 'greedy', not {mode}/{decoding}", 422)
        num_beams = request.num_beams
        if num_beams is None and decoding != "greedy":
            num_beams = config.num_beams  # what `model.generate` would use: the cost counts it
        return Settings(mode, decoding, self._k(request.k), num_beams, max_new_tokens)

    def _k(self, k: int | None) -> int:
        k = self.model.config.k if k is None else k
        size = len(self.active.index)
        if not 1 <= k <= size:
            raise ServiceError(f"k must be between 1 and the size of index '{self.active.name}' ({size}), got {k}", 422)
        return k

    # ---- the batch methods (library level; the batcher runs them on its worker thread) ----------------
    def retrieve_batch(self, questions: list[str], k: int) -> tuple[RetrievedBatch, ActiveIndex, float]:
        """Top-k passages for every question from the active index, and which index that was."""
        start = time.perf_counter()
        with self._lock:
            active = self.active
            retrieved = self.model.retrieve(questions, k)
        return retrieved, active, time.perf_counter() - start

    def answer_batch(self, questions: list[str], settings: Settings, on_token=None, on_retrieved=None
                     ) -> tuple[list[Answer], ActiveIndex, dict]:
        """One batched retrieval, then one batched generation: the same answers as `model.generate` alone.

        on_retrieved(retrieved, active): called between the two (a stream shows the passages first)."""
        retrieved, active, retrieve_s = self.retrieve_batch(questions, settings.k)
        if on_retrieved is not None:
            on_retrieved(retrieved, active)
        start = time.perf_counter()
        answers = self.model.generate(
            questions, mode=settings.mode, decoding=settings.decoding, num_beams=settings.num_beams,
            max_new_tokens=settings.max_new_tokens, retrieved=retrieved, on_token=on_token,
        )
        return answers, active, {"retrieve_ms": _ms(retrieve_s), "generate_ms": _ms(time.perf_counter() - start)}

    def _run(self, key, jobs: list[Job]) -> list[dict]:
        def check() -> None:  # at every decoding step: stop when nobody is left to answer
            if self.stopping or all(job.gone for job in jobs):
                raise Abandoned

        with interruptible(check):
            return self._run_batch(key, jobs)

    def _run_batch(self, key, jobs: list[Job]) -> list[dict]:
        kind, value = key
        self.metrics.batch(kind, len(jobs))
        questions = [job.payload for job in jobs]
        if kind == "retrieve":
            retrieved, active, retrieve_s = self.retrieve_batch(questions, value)
            probs = retrieved.log_prior.exp().tolist()
            return [{"question": q, "passages": _passages(retrieved.passages[b], probs[b]), "index": active.ref(),
                     "timings": self._timings(job, len(jobs), retrieve_ms=_ms(retrieve_s))}
                    for b, (q, job) in enumerate(zip(questions, jobs, strict=True))]
        streaming = any(job.events is not None for job in jobs)
        on_token = self._streamer(jobs) if streaming else None
        on_retrieved = self._evidence(jobs) if streaming else None
        answers, active, timings = self.answer_batch(questions, value, on_token, on_retrieved)
        return [{**answer.to_json(), "index": active.ref(), "timings": self._timings(job, len(jobs), **timings)}
                for answer, job in zip(answers, jobs, strict=True)]

    def _streamer(self, jobs: list[Job]):
        tokenizer = self.model.generator.tokenizer
        texts = [TextStream(tokenizer) for _ in jobs]

        def on_token(step, token_ids, posterior) -> None:
            if self.stopping or all(job.gone for job in jobs):
                raise Abandoned
            ids, post = token_ids.tolist(), posterior.tolist()
            for b, job in enumerate(jobs):
                if job.events is not None and ids[b] >= 0:
                    job.emit("token", {"step": step, "token_id": ids[b], "token": tokenizer.decode([ids[b]]),
                                       "text": texts[b].push(ids[b]), "posterior": post[b]})

        return on_token

    @staticmethod
    def _evidence(jobs: list[Job]):
        def on_retrieved(retrieved: RetrievedBatch, active: ActiveIndex) -> None:
            probs = retrieved.log_prior.exp().tolist()
            for b, job in enumerate(jobs):
                job.emit("passages", {"passages": _passages(retrieved.passages[b], probs[b]), "index": active.ref()})

        return on_retrieved

    @staticmethod
    def _timings(job: Job, size: int, **measured) -> dict:
        return {"queue_ms": _ms(job.started - job.enqueued), "batch_size": size, **measured}

    # ---- async entry points (what the routes call) -----------------------------------------------------
    def submit_ask(self, request: AskRequest) -> Job:
        """Admit and queue a request (streamed or not): 4xx when the limits refuse it. A streamed one sends
        `job.events` (token dicts), then `job.future` holds the answer."""
        settings = self.settings(request)
        cost = self.check_cost(settings)
        self.admit(cost)
        return self.batcher.submit(("ask", settings), request.question, stream=request.stream, cost=cost)

    async def ask(self, request: AskRequest, left: asyncio.Future | None = None) -> dict:
        return await self.result(self.submit_ask(request), left)

    def ask_stream(self, request: AskRequest) -> Job:
        """Queue a streamed request: read `job.events` (token dicts), then `job.future` (the answer)."""
        return self.submit_ask(request.model_copy(update={"stream": True}))

    async def retrieve(self, request: RetrieveRequest, left: asyncio.Future | None = None) -> dict:
        k = self._k(request.k)
        self.admit(RETRIEVE_COST)
        return await self.result(self.batcher.submit(("retrieve", k), request.question, cost=RETRIEVE_COST), left)

    # ---- indexes ---------------------------------------------------------------------------------------
    def index_dir(self, name: str) -> Path:
        """The folder of index `name` under the root; names only — a path, '..' or an absolute name is refused."""
        if not isinstance(name, str) or not INDEX_NAME.fullmatch(name) or ".." in name:
            raise ServiceError(f"'{name}' is not an index name: give the name of a folder under the indexes root "
                               "(letters, digits, '.', '_', '-'; no paths)", 400)
        directory = self.root / name
        if not (directory / MANIFEST).is_file():
            raise ServiceError(f"no index named '{name}' under the indexes root: GET /v1/indexes lists them", 404)
        return directory

    def load_index(self, name: str) -> ActiveIndex:
        directory = self.index_dir(name)
        try:
            return ActiveIndex(name, self.open_index(directory), manifest_sha256(directory))
        except ServiceError:
            raise
        except LatentRagError as e:
            raise ServiceError(f"index '{name}' cannot be loaded: {e}", 422) from e

    def index_list(self) -> dict:
        """Every index folder under the root with its manifest; which one answers now."""
        out = []
        for directory in sorted(p for p in self.root.iterdir() if (p / MANIFEST).is_file()):
            entry = {"name": directory.name, "active": directory.name == self.active.name,
                     "manifest_sha256": None, "manifest": None}
            try:
                entry["manifest"] = json.loads((directory / MANIFEST).read_text())
                entry["manifest_sha256"] = manifest_sha256(directory)
            except (OSError, ValueError) as e:
                entry["error"] = f"unreadable manifest: {e}"
            out.append(entry)
        return {"root": str(self.root), "active": self.active.name, "indexes": out}

    def authorize(self, authorization: str | None) -> None:
        if not self.admin_token:
            raise ServiceError(f"index swapping is disabled: start the server with {TOKEN_ENV} set", 403)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.admin_token.encode()):
            raise ServiceError("swapping the index needs 'Authorization: Bearer <token>' with the admin token", 401)

    def swap(self, name: str, authorization: str | None) -> dict:
        """Make index `name` answer later requests; requests already retrieving finish on the old one."""
        self.authorize(authorization)
        candidate = self.load_index(name)
        try:
            self.model.retriever.check_index(candidate.index)
        except LatentRagError as e:
            raise ServiceError(str(e), 409) from e
        with self._lock:
            previous = self.active
            self.model.swap_index(candidate.index)
            self.active = candidate
        self.metrics.swapped()
        return {"previous": previous.name, **candidate.ref()}

    async def swap_async(self, name: str, authorization: str | None) -> dict:
        return await asyncio.to_thread(self.swap, name, authorization)
