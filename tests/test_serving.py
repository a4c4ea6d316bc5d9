"""The HTTP service on tiny models: the API through an HTTP client against the real app, micro-batching
(a batched answer = the library's answer alone), streaming, bad input (4xx, never 500), hot swap."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient
from tiny_models import (
    QUESTIONS,
    steer_decoding,
    tiny_decoder_only_generator,
    tiny_dense_encoder,
    tiny_passages,
)

from latentrag.model import RagConfig, RagModel
from latentrag.retrieval.corpus import Passage
from latentrag.retrieval.index import build_index
from latentrag.retrieval.retriever import Retriever
from latentrag.serving import create_app
from latentrag.serving.schemas import AskRequest
from latentrag.serving.service import Abandoned, RagService, ServiceError

K = 3
TOKEN = "s3cret-token"
OTHER_FACTS = [Passage(id=f"b{i}", title=f"Alt {i}", text=f"Alternative fact number {i} about the Moon and Paris.")
               for i in range(6)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Three indexes: 'facts' and 'alt' by the model's document tower, 'foreign' by another tower."""
    root = tmp_path_factory.mktemp("indexes")
    document_encoder = tiny_dense_encoder("dpr-context", seed=2)
    build_index(tiny_passages(), document_encoder, root / "facts", progress=False)
    build_index(OTHER_FACTS, document_encoder, root / "alt", progress=False)
    build_index(tiny_passages(), tiny_dense_encoder("dpr-context", seed=9), root / "foreign", progress=False)
    return root


@pytest.fixture(scope="module")
def model(root):
    identity = tiny_dense_encoder("dpr-context", seed=2).identity()
    retriever = Retriever(tiny_dense_encoder("dpr-question", seed=1), identity)
    return RagModel(retriever, tiny_decoder_only_generator(seed=0), RagConfig(k=K, max_new_tokens=6))


def _service(model, root, **kw) -> RagService:
    kw.setdefault("admin_token", "")
    return RagService(model, root, "facts", **kw)


@pytest.fixture
def client(model, root):
    with TestClient(create_app(_service(model, root, admin_token=TOKEN))) as c:
        yield c


def _without_timings(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "timings"}


def _close(a, b, tol=1e-4):
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    return abs(a - b) <= tol


def _same_answer(served: dict, alone) -> None:
    expected = alone.to_json()
    assert served["answer"] == expected["answer"] and served["tokens"] == expected["tokens"]
    assert [p["id"] for p in served["passages"]] == [p["id"] for p in expected["passages"]]
    assert _close([p["probability"] for p in served["passages"]], [p["probability"] for p in expected["passages"]])
    assert _close(served["posterior"], expected["posterior"])
    assert served["log_prob"] == pytest.approx(expected["log_prob"], abs=1e-4)


def test_ask_answers_with_evidence_index_and_timings(client, model):
    r = client.post("/v1/ask", json={"question": "  Who wrote Hamlet?  ", "k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["question"] == "Who wrote Hamlet?" and body["mode"] == "token" and body["decoding"] == "greedy"
    assert len(body["passages"]) == 2 and len(body["posterior"]) == len(body["tokens"])
    assert body["index"]["name"] == "facts" and len(body["index"]["manifest_sha256"]) == 64
    assert set(body["timings"]) == {"queue_ms", "retrieve_ms", "generate_ms", "batch_size"}
    _same_answer(body, model.generate("Who wrote Hamlet?", k=2)[0])
    seq = client.post("/v1/ask", json={"question": "Who wrote Hamlet?", "mode": "sequence", "decoding": "fast",
                                       "num_beams": 2}).json()
    assert seq["mode"] == "sequence" and len(seq["posterior"]) == K
    _same_answer(seq, model.generate("Who wrote Hamlet?", mode="sequence", decoding="fast", num_beams=2)[0])


def test_retrieve_health_ready_docs_page_and_metrics(client):
    r = client.post("/v1/retrieve", json={"question": "Which river flows through Egypt?", "k": 4})
    assert r.status_code == 200
    probs = [p["probability"] for p in r.json()["passages"]]
    assert len(probs) == 4 and sum(probs) == pytest.approx(1.0, abs=1e-5) and probs == sorted(probs, reverse=True)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["index"]["name"] == "facts"
    assert client.get("/docs").status_code == 200
    assert "/v1/ask" in client.get("/openapi.json").json()["paths"]
    assert "<html" in client.get("/").text.lower()
    client.post("/v1/ask", json={"question": ""})
    text = client.get("/metrics").text
    assert 'latentrag_requests_total{code="200",endpoint="/v1/retrieve"} 1.0' in text
    assert 'latentrag_errors_total{code="422",endpoint="/v1/ask"} 1.0' in text
    assert 'latentrag_request_latency_seconds_bucket{endpoint="/v1/retrieve",le="+Inf"} 1.0' in text
    assert 'latentrag_batch_size_count{kind="retrieve"} 1.0' in text


BAD_ASKS = [
    ({"question": "   "}, 422, "question"),
    ({"question": "x" * 2001}, 422, "question"),
    ({}, 422, "question"),
    ({"question": 42}, 422, "question"),
    ({"question": "qz " * 600}, 422, "shorten the question"),  # leaves the generator no room for a passage
    ({"question": "Who?", "k": 0}, 422, "k"),
    ({"question": "Who?", "k": "3"}, 422, "k"),
    ({"question": "Who?", "k": 11}, 422, "size of index"),  # bounded by the index (10 passages)
    ({"question": "Who?", "num_beams": 99}, 422, "num_beams"),
    ({"question": "Who?", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"question": "Who?", "max_new_tokens": 10**6}, 422, "max_new_tokens"),
    ({"question": "Who?", "mode": "document"}, 422, "mode"),
    ({"question": "Who?", "decoding": "sampling"}, 422, "decoding"),
    ({"question": "Who?", "mode": "token", "decoding": "thorough"}, 422, "RAG-Token decodes"),
    ({"question": "Who?", "decoding": "greedy", "num_beams": 3}, 422, "one beam"),
    ({"question": "Who?", "stream": True, "mode": "sequence"}, 422, "streaming"),
    ({"question": "Who?", "stream": "yes"}, 422, "stream"),
    ({"question": "Who?", "temperature": 0.7}, 422, "temperature"),
    ([1, 2], 422, "object"),
]


@pytest.mark.parametrize("body,status,says", BAD_ASKS)
def test_bad_input_is_a_4xx_that_says_what_was_wrong(client, body, status, says):
    r = client.post("/v1/ask", json=body)
    assert r.status_code == status, r.text
    assert says.lower() in r.json()["error"].lower()


def test_bad_json_oversized_bodies_and_unknown_paths(client):
    r = client.post("/v1/ask", content=b'{"question": "Who', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = client.post("/v1/ask", content=b"x" * 20_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger" in r.json()["error"]
    chunks = iter([b'{"question": "', b"y" * 20_000, b'"}'])  # no Content-Length: counted as it arrives
    r = client.post("/v1/ask", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert client.post("/v1/retrieve", json={"question": "Who?", "k": 999}).status_code == 422
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert client.get("/v1/ask").status_code == 405


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_stream_sends_each_token_with_its_posterior_then_the_answer(client):
    plain = client.post("/v1/ask", json={"question": "What is the capital of France?"}).json()
    with client.stream("POST", "/v1/ask", json={"question": "What is the capital of France?", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.read().decode())
    assert [name for name, _ in events] == ["passages"] + ["token"] * len(plain["tokens"]) + ["answer"]
    assert events[0][1] == {"passages": plain["passages"], "index": plain["index"]}
    assert _without_timings(events[-1][1]) == _without_timings(plain)
    for i, (_, token) in enumerate(events[1:-1]):
        assert token["step"] == i and token["token"] == plain["tokens"][i]
        assert _close(token["posterior"], plain["posterior"][i])


async def _concurrent_asks(service: RagService, bodies: list[dict]) -> list[dict]:
    app = create_app(service)
    await service.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            responses = await asyncio.gather(*(c.post("/v1/ask", json=b) for b in bodies))
    finally:
        await service.stop()
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


def test_concurrent_requests_share_a_batch_and_get_the_answer_they_would_get_alone(model, root):
    service = _service(model, root, max_batch=8, max_wait_ms=500)  # long enough that all five meet
    bodies = [{"question": q} for q in QUESTIONS] + [{"question": QUESTIONS[0], "mode": "sequence"}]
    served = asyncio.run(_concurrent_asks(service, bodies))
    assert [s["timings"]["batch_size"] for s in served] == [5] * 5 + [1]  # other settings, other batch
    for body, answer in zip(bodies, served, strict=True):
        _same_answer(answer, model.generate(body["question"], mode=body.get("mode"))[0])


def test_batches_are_bounded(model, root):
    service = _service(model, root, max_batch=2, max_wait_ms=500)
    served = asyncio.run(_concurrent_asks(service, [{"question": q} for q in QUESTIONS]))
    assert sorted(s["timings"]["batch_size"] for s in served) == [1, 2, 2, 2, 2]


def test_index_list_and_hot_swap(client):
    listed = client.get("/v1/indexes").json()
    assert [i["name"] for i in listed["indexes"]] == ["alt", "facts", "foreign"] and listed["active"] == "facts"
    assert all(len(i["manifest_sha256"]) == 64 and i["manifest"]["count"] for i in listed["indexes"])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/v1/index", json={"name": "alt"}).status_code == 401
    assert client.post("/v1/index", json={"name": "alt"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    for name in ("../facts", "/tmp", "a/b", "..", ".hidden", ""):
        r = client.post("/v1/index", json={"name": name}, headers=auth)
        assert r.status_code in (400, 422) and "error" in r.json(), name
    r = client.post("/v1/index", json={"name": "missing"}, headers=auth)
    assert r.status_code == 404 and "GET /v1/indexes" in r.json()["error"]
    r = client.post("/v1/index", json={"name": "foreign"}, headers=auth)
    assert r.status_code == 409 and "document encoder" in r.json()["error"]
    before = client.post("/v1/ask", json={"question": "Who wrote Hamlet?"}).json()
    r = client.post("/v1/index", json={"name": "alt"}, headers=auth)
    assert r.status_code == 200 and r.json()["name"] == "alt" and r.json()["previous"] == "facts"
    after = client.post("/v1/ask", json={"question": "Who wrote Hamlet?"}).json()
    assert after["index"]["name"] == "alt" and after["index"]["manifest_sha256"] != before["index"]["manifest_sha256"]
    assert {p["id"] for p in after["passages"]} <= {p.id for p in OTHER_FACTS}
    assert client.post("/v1/ask", json={"question": "Who?", "k": 7}).status_code == 422  # alt holds 6
    assert client.get("/readyz").json()["index"]["name"] == "alt"
    assert client.post("/v1/index", json={"name": "facts"}, headers=auth).status_code == 200


def test_swapping_is_disabled_without_a_token(model, root):
    with TestClient(create_app(_service(model, root, admin_token=""))) as c:
        r = c.post("/v1/index", json={"name": "alt"}, headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and "LATENTRAG_ADMIN_TOKEN" in r.json()["error"]


def test_a_request_in_flight_finishes_on_the_index_it_started_with(model, root):
    service = _service(model, root, admin_token=TOKEN)
    settings = service.settings(AskRequest(question="Who wrote Hamlet?"))
    swapped = []

    def swap_mid_decoding(step, token_ids, posterior):
        if not swapped:
            swapped.append(service.swap("alt", f"Bearer {TOKEN}"))

    answers, used, _ = service.answer_batch(["Who wrote Hamlet?"], settings, on_token=swap_mid_decoding)
    assert swapped and used.name == "facts" and service.active.name == "alt"
    assert {p.id for p in answers[0].passages} <= {p.id for p in tiny_passages()}
    _, now, _ = service.answer_batch(["Who wrote Hamlet?"], settings)
    assert now.name == "alt"
    service.swap("facts", f"Bearer {TOKEN}")


def test_abandoned_streams_cost_nothing_else(model, root):
    async def scenario():
        service = _service(model, root, max_wait_ms=50)
        await service.start()
        try:
            gone = service.ask_stream(AskRequest(question="Who wrote Hamlet?", stream=True))
            gone.abandoned = True  # the client left before its batch ran: it never runs
            kept = await service.ask(AskRequest(question="Who wrote Hamlet?"))
            return gone, kept, service.batcher.batches
        finally:
            await service.stop()

    gone, kept, batches = asyncio.run(scenario())
    assert kept["answer"] is not None and batches == 1 and not gone.future.done()
    service = _service(model, root)
    job = type("J", (), {"gone": True, "events": None})()
    with pytest.raises(Abandoned):  # every client of a running batch left: decoding stops at its next step
        service.model.generate(["Who?"], on_token=service._streamer([job]))


def test_service_errors_carry_their_status(model, root):
    service = _service(model, root)
    with pytest.raises(ServiceError) as info:
        service.index_dir("../etc")
    assert info.value.status == 400


def test_cli_serve_is_a_thin_call_of_the_loader(root, tmp_path, monkeypatch, capsys):
    import uvicorn
    from tiny_models import tiny_bart

    from latentrag import cli

    tiny_dense_encoder("dpr-question", seed=1).save_pretrained(tmp_path / "q")
    tiny_dense_encoder("dpr-context", seed=2).save_pretrained(tmp_path / "ctx")
    bart, tok = tiny_bart(seed=0)
    bart.save_pretrained(tmp_path / "gen")
    tok.save_pretrained(tmp_path / "gen")
    RagModel.from_components(query_encoder=str(tmp_path / "q"), document_encoder=str(tmp_path / "ctx"),
                             generator=str(tmp_path / "gen"), k=2, max_new_tokens=4).save_pretrained(tmp_path / "saved")
    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    argv = ["--threads", "1", "serve", "--model", str(tmp_path / "saved"), "--indexes-root", str(root)]
    assert cli.main([*argv, "--index", "facts", "--port", "9999", "--max-batch", "4"]) == 0
    service = captured["app"].state.service
    assert captured["port"] == 9999 and service.batcher.max_batch == 4 and service.active.name == "facts"
    with TestClient(captured["app"]) as c:
        body = c.post("/v1/ask", json={"question": "Who wrote Hamlet?"}).json()
    assert len(body["passages"]) == 2 and body["index"]["name"] == "facts"
    assert cli.main(argv) == 2 and "choose one with --index" in capsys.readouterr().err  # three indexes
    assert cli.main([*argv, "--index", "../facts"]) == 2 and "not an index name" in capsys.readouterr().err
    assert cli.main([*argv, "--index", "foreign"]) == 2 and "document encoder" in capsys.readouterr().err
    assert cli.main([*argv, "--index", "facts", "--max-batch", "0"]) == 2 and "max batch" in capsys.readouterr().err


def test_one_bad_request_fails_only_itself(model, root, monkeypatch):
    from latentrag.errors import LatentRagError

    original = model.retrieve

    def retrieve(questions, k=None):
        if any("poison" in q for q in questions):
            raise LatentRagError("this question cannot be answered")
        return original(questions, k)

    monkeypatch.setattr(model, "retrieve", retrieve)
    service = _service(model, root, max_batch=8, max_wait_ms=500)

    async def scenario():
        app = create_app(service)
        await service.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
                return await asyncio.gather(*(c.post("/v1/ask", json={"question": q})
                                              for q in ["poison pill", *QUESTIONS[:2]]))
        finally:
            await service.stop()

    bad, *good = asyncio.run(scenario())
    assert bad.status_code == 400 and "cannot be answered" in bad.json()["error"]
    assert [r.status_code for r in good] == [200, 200]
    assert [r.json()["timings"]["batch_size"] for r in good] == [1, 1]  # rerun alone after the batch was refused


def test_a_client_that_leaves_mid_stream_stops_its_decoding(model, root, monkeypatch):
    """Over a real socket: the client reads one token and hangs up; decoding stops, the server carries on."""
    import socket
    import threading
    import time

    import uvicorn

    gen, steps = model.generator, []

    def no_end(logprobs):  # never </s>: without the hang-up, decoding would run all max_new_tokens steps
        logprobs[..., gen.eos_token_id] = float("-inf")
        return logprobs

    steer_decoding(monkeypatch, gen, no_end, on_step=lambda: (steps.append(time.perf_counter()), time.sleep(0.02)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(_service(model, root, max_wait_ms=1)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        body = {"question": "Who wrote Hamlet?", "stream": True, "max_new_tokens": 200}
        with httpx.stream("POST", url + "/v1/ask", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("event: token"):
                    break  # leave after the first token
        taken, deadline = -1, time.perf_counter() + 60
        while len(steps) != taken and time.perf_counter() < deadline:  # until decoding is quiet for 0.5 s
            taken = len(steps)
            time.sleep(0.5)
        assert taken < 199  # stopped before its 200 tokens (199 steps after the first), not run to the end
        monkeypatch.undo()
        assert httpx.post(url + "/v1/ask", json={"question": "Who wrote Hamlet?"}, timeout=30).status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
