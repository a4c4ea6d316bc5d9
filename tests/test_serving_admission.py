"""Admission control of the HTTP service on tiny models (issue 20): a cost bound per request (422), a bounded
queue (429) and cost budget (503) with Retry-After, a deadline, work dropped when the client leaves (streamed
or not, every decoding), readiness that reports saturation, a bounded shutdown, metrics for all of it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from tiny_models import (
    forcing,
    llama_tokenizer,
    steer_decoding,
    tiny_decoder_only_generator,
    tiny_dense_encoder,
    tiny_passages,
)

from latentrag.model import RagConfig, RagModel
from latentrag.retrieval.index import build_index
from latentrag.retrieval.retriever import Retriever
from latentrag.serving import create_app
from latentrag.serving.admission import Limits, request_cost
from latentrag.serving.schemas import AskRequest
from latentrag.serving.service import RagService, ServiceError, TextStream


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    build_index(tiny_passages(), tiny_dense_encoder("dpr-context", seed=2), root / "facts", progress=False)
    return root


@pytest.fixture(scope="module")
def model(root):
    identity = tiny_dense_encoder("dpr-context", seed=2).identity()
    retriever = Retriever(tiny_dense_encoder("dpr-question", seed=1), identity)
    return RagModel(retriever, tiny_decoder_only_generator(seed=0), RagConfig(k=3, max_new_tokens=6))


def _service(model, root, **limits) -> RagService:
    return RagService(model, root, "facts", max_wait_ms=1, admin_token="", limits=Limits(**limits))


@pytest.fixture
def endless(model, monkeypatch):
    """Decoding never ends by itself (</s> banned) and each step takes 20 ms; `steps` records them."""
    gen, steps = model.generator, []

    def no_end(logprobs):
        logprobs[..., gen.eos_token_id] = float("-inf")
        return logprobs

    steer_decoding(monkeypatch, gen, no_end, on_step=lambda: (steps.append(time.perf_counter()), time.sleep(0.02)))
    return steps


def _quiet(steps: list, deadline_s: float = 60) -> int:
    """Wait until no decoding step ran for 0.5 s; how many ran."""
    taken, deadline = -1, time.perf_counter() + deadline_s
    while len(steps) != taken and time.perf_counter() < deadline:
        taken = len(steps)
        time.sleep(0.5)
    return taken


class Server:
    """The app under uvicorn on a loopback port, in a thread (what `latentrag serve` runs)."""

    def __init__(self, service: RagService, grace: float = 10.0):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{s.getsockname()[1]}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                                    log_level="warning", timeout_graceful_shutdown=grace))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def test_the_cost_of_a_request():
    assert request_cost("greedy", 5, None, 32) == 5 * (256 + 32)
    assert request_cost("beam", 5, 4, 32) == 5 * (256 + 4 * 32)
    assert request_cost("fast", 5, 4, 32) == 5 * (256 + 4 * 32)
    assert request_cost("thorough", 5, 4, 32) == 5 * (256 + 4 * 32 * 6)
    # the request of the issue: ~10 million, far above the default bound; the page's defaults are far below it
    assert request_cost("thorough", 50, 16, 256) > 500 * Limits().max_cost
    assert request_cost("thorough", 5, 4, 32) < Limits().max_cost  # the page: RAG-Sequence, k = 5, 4 beams
    with pytest.raises(Exception, match="max-pending-cost"):
        Limits(max_cost=100, max_pending_cost=50)


def test_the_cost_counts_the_beams_the_model_would_use(model, root):
    service = _service(model, root)
    settings = service.settings(AskRequest(question="Who?", mode="sequence", k=3))  # thorough, beams unset
    assert settings.num_beams == model.config.num_beams > 1
    assert service.check_cost(settings) == request_cost("thorough", 3, model.config.num_beams, 6)


def test_a_request_over_the_cost_bound_is_refused_with_what_to_do(model, root):
    with TestClient(create_app(_service(model, root, max_cost=2000))) as c:
        r = c.post("/v1/ask", json={"question": "Who?", "mode": "sequence", "decoding": "thorough", "k": 3,
                                    "num_beams": 4, "max_new_tokens": 50})
        assert r.status_code == 422
        assert "--max-cost" in r.json()["error"] and "lower k" in r.json()["error"]
        assert c.post("/v1/ask", json={"question": "Who?", "k": 3, "max_new_tokens": 6}).status_code == 200
        assert 'latentrag_rejected_total{reason="cost"} 1.0' in c.get("/metrics").text


@pytest.mark.parametrize("question", ["\u200b\u200b", "\u200b \u2060\ufeff", "\x00\x01"])
def test_a_question_without_a_visible_character_is_refused(model, root, question):
    with TestClient(create_app(_service(model, root))) as c:
        for path in ("/v1/ask", "/v1/retrieve"):
            r = c.post(path, json={"question": question})
            assert r.status_code == 422 and "visible" in r.json()["error"], r.text
        assert c.post("/v1/ask", json={"question": "\u200bWho wrote Hamlet?"}).status_code == 200


def test_full_queue_is_429_spent_budget_is_503_and_readiness_says_saturated(model, root, monkeypatch):
    service = _service(model, root, max_queue=1, max_cost=5000, max_pending_cost=5000)
    gate = threading.Event()
    run = service._run_batch
    monkeypatch.setattr(service, "_run_batch", lambda key, jobs: (gate.wait(30), run(key, jobs))[1])
    small = {"question": "Who wrote Hamlet?", "k": 2, "max_new_tokens": 4}  # cost 2·(256+4) = 520

    async def scenario():
        app = create_app(service)
        await service.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                first = asyncio.ensure_future(c.post("/v1/ask", json=small))  # runs (held at the gate)
                while not service.batcher.running:
                    await asyncio.sleep(0.01)
                second = asyncio.ensure_future(c.post("/v1/ask", json=small))  # waits
                while service.batcher.depth < 1:
                    await asyncio.sleep(0.01)
                full = await c.post("/v1/ask", json=small)
                ready = await c.get("/readyz")
                metrics = (await c.get("/metrics")).text
                service.limits.max_queue = 8  # now the cost budget refuses: 520 + 520 + 4096 > 5000
                spent = await c.post("/v1/ask", json={**small, "k": 8, "max_new_tokens": 256})
                gate.set()
                done = await asyncio.gather(first, second)
                after = await c.get("/readyz")
                return full, ready, metrics, spent, done, after, (await c.get("/metrics")).text
        finally:
            gate.set()
            await service.stop()

    full, ready, metrics, spent, done, after, final = asyncio.run(scenario())
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    assert "waiting" in full.json()["error"]
    assert ready.status_code == 503 and ready.json()["status"] == "saturated" and "Retry-After" in ready.headers
    assert ready.json()["queue_depth"] == 1 and ready.json()["in_flight"] == 1
    assert "latentrag_queue_depth 1.0" in metrics and "latentrag_in_flight 1.0" in metrics
    assert "latentrag_pending_cost 1040.0" in metrics
    assert spent.status_code == 503 and int(spent.headers["Retry-After"]) >= 1 and "saturated" in spent.json()["error"]
    assert [r.status_code for r in done] == [200, 200]
    assert after.status_code == 200 and after.json()["status"] == "ready"
    assert 'latentrag_rejected_total{reason="queue_full"} 1.0' in final
    assert 'latentrag_rejected_total{reason="saturated"} 1.0' in final
    assert "latentrag_queue_depth 0.0" in final and "latentrag_in_flight 0.0" in final


def test_a_request_past_its_deadline_is_dropped_and_never_runs(model, root, monkeypatch):
    service = _service(model, root, timeout_s=0.3)
    gate, ran = threading.Event(), []
    run = service._run_batch

    def held(key, jobs):
        ran.append([job.payload for job in jobs])
        gate.wait(30)
        return run(key, jobs)

    monkeypatch.setattr(service, "_run_batch", held)

    async def scenario():
        await service.start()
        try:
            first = asyncio.ensure_future(service.ask(AskRequest(question="first?")))
            while not service.batcher.running:
                await asyncio.sleep(0.01)
            with pytest.raises(ServiceError) as late:
                await service.ask(AskRequest(question="second?"))  # waits behind the first: its deadline passes
            gate.set()
            with pytest.raises(ServiceError):
                await first  # ran past the deadline too (held at the gate)
            await service.ask(AskRequest(question="third?"))  # the worker is free again
            return late.value
        finally:
            gate.set()
            await service.stop()

    late = asyncio.run(scenario())
    assert late.status == 503 and "--request-timeout" in str(late) and late.headers["Retry-After"]
    assert ["second?"] not in ran and ["third?"] in ran  # the dropped request never ran
    assert service.metrics.cancellations.labels("deadline")._value.get() == 2


@pytest.mark.parametrize("body", [
    {"stream": True},
    {},  # not streamed: the server notices the disconnect too
    {"mode": "sequence", "decoding": "thorough", "num_beams": 2},  # any decoding stops, not only greedy
])
def test_a_client_that_leaves_stops_its_work(model, root, endless, body):
    service = _service(model, root)
    with Server(service) as server:
        ask = {"question": "Who wrote Hamlet?", "max_new_tokens": 200, **body}
        if body.get("stream"):
            with httpx.stream("POST", server.url + "/v1/ask", json=ask, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("event: token"):
                        break  # leave after the first token
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/ask", json=ask, timeout=1.0)  # gives up after 1 s
        taken = _quiet(endless)
        assert 0 < taken < 150  # stopped well before its 200 tokens (x2 beams), not run to the end
        assert not service.batcher.busy and service.batcher.pending_cost == 0
        metrics = httpx.get(server.url + "/metrics").text
        assert 'latentrag_cancelled_total{reason="client_left"} 1.0' in metrics
        assert httpx.post(server.url + "/v1/ask", json={"question": "Hi?", "max_new_tokens": 2},
                          timeout=30).status_code == 200


def test_shutdown_is_bounded_by_the_grace_period(model, root, endless):
    service = _service(model, root)
    server = Server(service, grace=0.5)
    server.__enter__()
    result = {}

    def long_request():
        try:
            r = httpx.post(server.url + "/v1/ask", json={"question": "Who wrote Hamlet?", "max_new_tokens": 256},
                           timeout=60)
            result["status"] = r.status_code
        except httpx.HTTPError as e:
            result["status"] = type(e).__name__

    client = threading.Thread(target=long_request)
    client.start()
    while not endless:
        time.sleep(0.02)
    t0 = time.perf_counter()
    server.server.should_exit = True  # what SIGTERM does
    server.thread.join(30)
    took = time.perf_counter() - t0
    client.join(30)
    assert not server.thread.is_alive() and took < 5, took  # 0.5 s of grace, then the decoding stops
    assert len(endless) < 200 and not service.batcher.busy
    assert result["status"] != 200
    assert service.metrics.cancellations.labels("shutdown")._value.get() == 1


def test_internal_errors_are_counted(model, root, monkeypatch):
    service = _service(model, root)

    async def broken(*a, **kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(service, "ask", broken)
    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        r = c.post("/v1/ask", json={"question": "Who?"})
        assert r.status_code == 500 and "Traceback" not in r.text
        text = c.get("/metrics").text
    assert 'latentrag_errors_total{code="500",endpoint="/v1/ask"} 1.0' in text


def test_streamed_text_never_breaks_a_character():
    tokenizer = llama_tokenizer()
    text = "Café — naïve 東京 ☃"
    ids = tokenizer.encode(text, add_special_tokens=False)
    alone = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in alone)  # the failure: a character split over byte tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) and not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # held back while a character was incomplete


def test_streamed_events_carry_whole_characters(model, root, monkeypatch):
    """The server forces an answer whose characters span several byte-level tokens: every `text` is whole."""
    gen = model.generator
    target = gen.tokenizer.encode(" 東京 ☃", add_special_tokens=False) + [gen.eos_token_id]
    steer_decoding(monkeypatch, gen, forcing(target))
    import json

    with TestClient(create_app(_service(model, root))) as c:
        body = {"question": "Where?", "stream": True, "max_new_tokens": len(target) + 2}
        with c.stream("POST", "/v1/ask", json=body) as r:
            events = [json.loads(line[6:]) for line in r.read().decode().splitlines() if line.startswith("data: ")]
    tokens = [e for e in events[1:-1]]
    assert [t["token_id"] for t in tokens] == target
    assert any("\ufffd" in t["token"] for t in tokens)
    assert not any("\ufffd" in t["text"] for t in tokens)
    assert "".join(t["text"] for t in tokens).startswith(" 東京 ☃")
