"""The page in a real browser: Debian's headless Chromium driven by Playwright (never `playwright install`).

A uvicorn server on loopback over tiny models; the test asks a question, sees the streamed answer (token
spans with their posterior on hover) and the passages, asks in RAG-Sequence mode, and switches the index.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest
import uvicorn
from tiny_models import (
    forcing,
    steer_decoding,
    tiny_decoder_only_generator,
    tiny_dense_encoder,
    tiny_passages,
)

from latentrag.model import RagConfig, RagModel
from latentrag.retrieval.corpus import Passage
from latentrag.retrieval.index import build_index
from latentrag.retrieval.retriever import Retriever
from latentrag.serving import RagService, create_app

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-token"
_server_model: list = []  # the model the server answers with (a test forces its output)

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None and not shutil.which(CHROMIUM),
                                reason="Debian's chromium is not installed (`make test` installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    document_encoder = tiny_dense_encoder("dpr-context", seed=2)
    build_index(tiny_passages(), document_encoder, root / "facts", progress=False)
    alt = [Passage(id=f"b{i}", title=f"Alternative {i}", text=f"Another fact, number {i}.") for i in range(6)]
    build_index(alt, document_encoder, root / "alt", progress=False)
    retriever = Retriever(tiny_dense_encoder("dpr-question", seed=1), document_encoder.identity())
    model = RagModel(retriever, tiny_decoder_only_generator(seed=0), RagConfig(k=3, max_new_tokens=8))
    service = RagService(model, root, "facts", max_wait_ms=2, admin_token=TOKEN)
    _server_model.append(model)
    port = _free_port()
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def test_ask_stream_passages_and_switch_the_index(server, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-width screen
    streamed = []
    page.on("response", lambda r: streamed.append(r.headers.get("content-type", ""))
            if r.url.endswith("/v1/ask") else None)
    page.goto(server + "/")
    page.wait_for_function("document.querySelectorAll('#index-select option').length === 2")

    page.fill("#question", "What is the capital of France?")
    page.fill("#k", "3")
    page.click("#ask")
    page.wait_for_selector("#answer[data-state=done]", timeout=30_000)
    assert streamed and streamed[-1].startswith("text/event-stream")
    tokens = page.locator("#answer .tok")
    assert tokens.count() >= 1
    title = tokens.first.get_attribute("title")
    assert title.startswith("p(z|x,y≤i):") and title.count("%") == 3
    assert tokens.first.get_attribute("data-passage") in ("1", "2", "3")
    assert page.locator("#passages .passage").count() == 3
    assert page.locator("#passages .bar.prior").count() == 3 and page.locator("#passages .bar.post").count() == 3
    assert "index facts" in page.text_content("#meta")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling

    page.select_option("#mode", "sequence")
    assert page.locator("#decoding option").all_text_contents() == ["thorough", "fast"]
    page.click("#ask")
    page.wait_for_selector("#answer[data-state=done]", timeout=30_000)
    assert page.locator("#passages .passage").count() == 3
    assert "p(z|x,y)" in page.text_content("#post-label")

    page.click("#index-panel summary")
    page.select_option("#index-select", "alt")
    page.fill("#token", "wrong")
    page.click("#swap")
    page.wait_for_selector("#swap-status.error")
    assert "Bearer" in page.text_content("#swap-status")
    page.fill("#token", TOKEN)
    page.click("#swap")
    page.wait_for_function("document.querySelector('#swap-status').textContent.includes('now answering from alt')")
    assert page.text_content("#active-index") == "alt"
    page.select_option("#mode", "token")
    page.click("#ask")
    page.wait_for_selector("#answer[data-state=done]", timeout=30_000)
    assert "index alt" in page.text_content("#meta")
    assert page.locator("#passages .title").first.text_content().startswith("[1] Alternative")


def test_bad_input_shows_the_servers_message(server, browser):
    page = browser.new_page()
    page.goto(server + "/")
    page.fill("#question", "   ")
    page.evaluate("document.querySelector('#question').removeAttribute('required')")
    page.click("#ask")
    page.wait_for_selector("#status.error")
    assert "question" in page.text_content("#status").lower()


def _offline(page, server):
    """Every request that leaves the server's origin is refused and recorded: the page must not need one."""
    outside = []

    def route(r):
        if r.request.url.startswith(server):
            return r.continue_()
        outside.append(r.request.url)
        return r.abort()

    page.route("**/*", route)
    return outside


def test_swagger_ui_works_offline(server, browser):
    page = browser.new_page()
    outside = _offline(page, server)
    page.goto(server + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)  # Swagger UI rendered the operations
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert any("/v1/ask" in p for p in paths) and any("/v1/retrieve" in p for p in paths)
    assert outside == []


def test_streamed_characters_are_never_broken_on_the_page(server, browser, monkeypatch):
    """The generator is forced to answer with characters that span several byte-level tokens."""
    gen = _server_model[0].generator
    target = gen.tokenizer.encode(" ☃ é", add_special_tokens=False) + [gen.eos_token_id]  # 8 tokens: the page asks 8
    steer_decoding(monkeypatch, gen, forcing(target))
    page = browser.new_page()
    page.goto(server + "/")
    page.fill("#question", "Where?")
    page.fill("#k", "2")
    page.click("#ask")
    page.wait_for_selector("#answer[data-state=done]", timeout=30_000)
    shown = page.text_content("#answer")
    assert "☃ é" in shown and "\ufffd" not in shown
