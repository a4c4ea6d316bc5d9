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
from dataclasses import dataclass
from pathlib import Path

from latentrag.errors import LatentRagError
from latentrag.model import Answer, RagModel
from latentrag.rag_types import rag_type
from latentrag.retrieval.index import MANIFEST, DenseIndex
from latentrag.retrieval.retriever import RetrievedBatch
from latentrag.serving.batcher import Job, MicroBatcher
from latentrag.serving.metrics import Metrics
from latentrag.serving.schemas import AskRequest, RetrieveRequest

TOKEN_ENV = "LATENTRAG_ADMIN_TOKEN"
INDEX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class ServiceError(LatentRagError):
    """A request the service refuses, with the HTTP status that says why (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Abandoned(Exception):
    """Every client of a batch went away: stop decoding for them."""


@dataclass(frozen=True)
class Settings:
    """A request's resolved decoding settings; requests with equal settings can share a batch."""

    mode: str
    decoding: str
    k: int
    num_beams: int | None
    max_new_tokens: int


@dataclass(frozen=True)
class ActiveIndex:
    name: str
    index: DenseIndex
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


class RagService:
    def __init__(self, model: RagModel, indexes_root: str | Path, index_name: str, max_batch: int = 8,
                 max_wait_ms: float = 5.0, admin_token: str | None = None):
        self.model = model
        self.root = Path(indexes_root).expanduser()
        if not self.root.is_dir():
            raise LatentRagError(f"indexes root {self.root} is not a folder: give --indexes-root DIR")
        self.admin_token = admin_token if admin_token is not None else os.environ.get(TOKEN_ENV) or None
        self._lock = threading.Lock()  # the active index: read with the retrieval, replaced by a swap
        self.active = self.load_index(index_name)
        model.swap_index(self.active.index)
        self.batcher = MicroBatcher(self._run, max_batch, max_wait_ms)
        self.metrics = Metrics()
        self.ready = False

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()

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
        return Settings(mode, decoding, self._k(request.k), request.num_beams, max_new_tokens)

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
        decode = self.model.generator.tokenizer.decode

        def on_token(step, token_ids, posterior) -> None:
            if all(job.gone for job in jobs):
                raise Abandoned
            ids, post = token_ids.tolist(), posterior.tolist()
            for b, job in enumerate(jobs):
                if job.events is not None and ids[b] >= 0:
                    job.emit("token", {"step": step, "token_id": ids[b], "token": decode([ids[b]]),
                                       "posterior": post[b]})

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
    async def ask(self, request: AskRequest) -> dict:
        job = self.batcher.submit(("ask", self.settings(request)), request.question)
        return await job.future

    def ask_stream(self, request: AskRequest) -> Job:
        """Queue a streamed request: read `job.events` (token dicts), then `job.future` (the answer)."""
        return self.batcher.submit(("ask", self.settings(request)), request.question, stream=True)

    async def retrieve(self, request: RetrieveRequest) -> dict:
        job = self.batcher.submit(("retrieve", self._k(request.k)), request.question)
        return await job.future

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
            return ActiveIndex(name, DenseIndex.load(directory), manifest_sha256(directory))
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
