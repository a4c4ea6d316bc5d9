"""The dense index: index types, exact d(z), resumable builds killed with SIGKILL, add/info/plan, hot swap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import Passage, read_corpus, split_passages
from latentrag.retrieval.encoders import DenseEncoder, freeze
from latentrag.retrieval.index import (
    EXACT,
    MANIFEST,
    DenseIndex,
    Manifest,
    add_to_index,
    build_index,
    encode_passages,
    index_info,
)
from latentrag.retrieval.index_plan import INDEX_TYPES, default_params, factory_string, memory_bytes, plan
from latentrag.retrieval.retriever import Retriever
from latentrag.threads import available_cores

WORDS = 40


def make_tiny_encoder(directory: Path, seed: int) -> Path:
    """A 2-layer, 32-dim random BERT with the bundled MiniLM tokenizer: milliseconds per batch."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from latentrag.assets import minilm_dir

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    model = BertModel(config).eval()  # with its pooler, so reloading initialises nothing at random
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    DenseEncoder(model, tokenizer, "mean", True, 128, f"tiny-bert-{seed}").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> DenseEncoder:
    return freeze(DenseEncoder.from_pretrained(str(tiny_dir)))


def write_corpus(path: Path, docs: int, prefix: str = "", start: int = 0) -> Path:
    """JSONL of `docs` wiki-leads documents (from `start`), ids prefixed, as a user would give."""
    reader = read_corpus("wiki-leads")
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(reader):
            if i < start:
                continue
            if i >= start + docs:
                break
            f.write(json.dumps({"id": prefix + doc.id, "title": doc.title, "text": doc.text}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.jsonl", 120)


def passages_of(path: Path) -> list[Passage]:
    return list(split_passages(read_corpus(path), words=WORDS))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny, corpus) -> dict[str, DenseIndex]:
    root = tmp_path_factory.mktemp("indexes")
    return {
        t: build_index(passages_of(corpus), tiny, root / t, index_type=t, progress=False, chunk_size=64)
        for t in INDEX_TYPES
    }


@pytest.fixture(scope="module")
def exact_vectors(tiny, corpus) -> np.ndarray:
    ps = passages_of(corpus)
    return encode_passages(tiny, [p.title for p in ps], [p.text for p in ps])


# ---- index types --------------------------------------------------------------------------------------
def test_encode_passages_matches_the_encoder(tiny, corpus):
    ps = passages_of(corpus)[:40]
    ours = encode_passages(tiny, [p.title for p in ps], [p.text for p in ps], batch_size=7)
    reference = tiny.encode([p.title for p in ps], [p.text for p in ps], batch_size=40).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("kind", list(INDEX_TYPES))
def test_every_type_reconstructs_exactly_and_scores_are_exact(built, kind, exact_vectors, corpus):
    index = built[kind]
    ps = passages_of(corpus)
    n = len(ps)
    assert len(index) == n == index.manifest.count and index.dim == 32
    assert index.manifest.factory == factory_string(kind, index.manifest.params)
    assert index.manifest.encoder["name"] == "tiny-bert-0" and len(index.manifest.encoder["sha256"]) == 64
    assert index.manifest.exact_vectors == (not INDEX_TYPES[kind].exact_reconstruct)
    assert (index.directory / EXACT).exists() == index.manifest.exact_vectors
    ids = np.arange(n).reshape(-1, 1)
    np.testing.assert_allclose(index.reconstruct(ids)[:, 0], exact_vectors, atol=1e-5)
    queries = exact_vectors[:20] + 0.01  # near (not equal to) stored vectors
    scores, found = index.search(queries, 5)
    assert found.shape == (20, 5) and (found >= 0).all()
    recomputed = np.einsum("bd,bkd->bk", queries, index.reconstruct(found))
    np.testing.assert_allclose(scores, recomputed, rtol=1e-4, atol=1e-4)  # faithful d(z)ᵀq(x)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    assert (found[:, 0] == np.arange(20)).mean() >= 0.9  # near-duplicates find themselves
    assert index.passages(found[:1, :2])[0][0] == ps[found[0, 0]]
    assert not list(index.directory.parent.glob(f".{kind}.*"))  # work folder gone


def test_flat_loads_memory_mapped_and_threads_follow_cores(built):
    index = DenseIndex.load(built["flat"].directory)
    maps = Path("/proc/self/maps").read_text()
    assert str(index.directory / "vectors.faiss") in maps
    assert faiss.omp_get_max_threads() <= available_cores()
    assert torch.get_num_threads() <= available_cores()


def test_search_parameters_recorded_and_settable_at_load(built):
    hnsw = DenseIndex.load(built["hnsw"].directory, ef_search=16)
    assert built["hnsw"].manifest.params["efSearch"] == 192
    assert faiss.downcast_index(hnsw.faiss).hnsw.efSearch == 16
    ivf = DenseIndex.load(built["ivf-sq8"].directory, nprobe=3, refine=2)
    assert faiss.extract_index_ivf(ivf.faiss).nprobe == 3 and ivf.search_params["refine"] == 2
    with pytest.raises(LatentRagError, match="nprobe does not apply"):
        DenseIndex.load(built["flat"].directory, nprobe=3)
    with pytest.raises(LatentRagError, match="k must be between"):
        hnsw.search(np.zeros((1, 32), np.float32), 0)
    with pytest.raises(LatentRagError, match="expects"):
        hnsw.search(np.zeros((1, 31), np.float32), 3)


def test_ivf_pq_parameters_handle_384_and_odd_dims():
    assert default_params("ivf-pq", 10_000, 384)["m"] == 64
    assert default_params("ivf-pq", 10_000, 768)["m"] == 64
    assert default_params("ivf-pq", 10_000, 100)["m"] == 50
    p = default_params("ivf-sq8", 10_000, 384)
    assert p["nlist"] == 256 and p["nprobe"] == 128  # 4·sqrt(N)=400 capped at N/39; at least 128 cells
    assert default_params("ivf-sq8", 21_000_000, 768)["nprobe"] == 271  # 2·sqrt(18330)
    assert default_params("ivf-sq8", 21_000_000, 768)["nlist"] == 18330


# ---- durability: SIGKILL mid-build, then resume ----------------------------------------------------------
def _build_cmd(corpus: Path, out: Path, encoder: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "latentrag", "--threads", "1", "index", "build", "--corpus", str(corpus),
            "--out", str(out), "--encoder", str(encoder), "--passage-words", str(WORDS), "--chunk-size", "16",
            "--quiet", *extra]


def _kill_when(cmd: list[str], ready, timeout: float = 120) -> bool:
    """Start cmd, SIGKILL it as soon as ready() holds; True if it was killed before finishing."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait(timeout=timeout)
    return False


@pytest.mark.integration
def test_sigkill_mid_build_leaves_nothing_valid_and_resume_matches(tmp_path, tiny, tiny_dir, monkeypatch):
    corpus = write_corpus(tmp_path / "big.jsonl", 300)
    reference = build_index(passages_of(corpus), tiny, tmp_path / "reference", chunk_size=16, progress=False)
    out = tmp_path / "idx"
    work = tmp_path / ".idx.build"
    killed = _kill_when(_build_cmd(corpus, out, tiny_dir), lambda: len(list(work.glob("chunk-*.npy"))) >= 3)
    assert killed, "the build finished before it could be killed"
    with pytest.raises(LatentRagError):
        DenseIndex.load(out)
    done = len(list(work.glob("chunk-*.npy")))
    total = -(-len(reference) // 16)
    assert 3 <= done < total

    # resume re-encodes only the missing chunks and gives the uninterrupted result
    import latentrag.retrieval.index.build as index_module

    encoded = []
    original = index_module.encode_passages

    def counting(encoder, titles, texts, *args, **kwargs):
        encoded.append(len(texts))
        return original(encoder, titles, texts, *args, **kwargs)

    monkeypatch.setattr(index_module, "encode_passages", counting)
    resumed = build_index(passages_of(corpus), tiny, out, chunk_size=16, progress=False, resume=True,
                          corpus=str(corpus), passage_words=WORDS)
    assert len(encoded) == total - done
    assert resumed.store.ids() == reference.store.ids()
    everything = np.arange(len(reference)).reshape(-1, 1)
    np.testing.assert_allclose(resumed.reconstruct(everything), reference.reconstruct(everything), atol=1e-5)
    assert not work.exists()


@pytest.mark.integration
def test_sigkill_while_assembling_then_resume(tmp_path, tiny, tiny_dir):
    corpus = write_corpus(tmp_path / "c.jsonl", 60)
    out = tmp_path / "idx"
    work = tmp_path / ".idx.build"
    cmd = _build_cmd(corpus, out, tiny_dir, "--index-type", "ivf-sq8")
    killed = _kill_when(cmd, lambda: (work / "out").exists())
    if killed:  # killed between the first assembled file and the final rename: nothing valid
        with pytest.raises(LatentRagError):
            DenseIndex.load(out)
    subprocess.run([*cmd, "--resume"], check=True, stderr=subprocess.PIPE)
    index = DenseIndex.load(out)
    assert len(index) == len(passages_of(corpus)) and not work.exists()


def test_resume_refuses_other_corpus_or_settings(tmp_path, tiny, corpus, monkeypatch):
    import latentrag.retrieval.index.build as index_module

    out = tmp_path / "idx"

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # an interruption after the first chunk

    calls = []
    original = index_module.encode_passages

    def once_then_die(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs) if len(calls) == 1 else die()

    monkeypatch.setattr(index_module, "encode_passages", once_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_index(passages_of(corpus), tiny, out, chunk_size=64, progress=False)
    monkeypatch.setattr(index_module, "encode_passages", original)
    assert not out.exists()
    with pytest.raises(LatentRagError, match="corpus differs"):
        build_index(passages_of(corpus)[:-1], tiny, out, chunk_size=64, progress=False, resume=True)
    with pytest.raises(LatentRagError, match="other settings"):
        build_index(passages_of(corpus), tiny, out, chunk_size=32, progress=False, resume=True)
    index = build_index(passages_of(corpus), tiny, out, chunk_size=64, progress=False, resume=True)
    assert len(index) == len(passages_of(corpus))


def test_rebuild_keeps_the_old_index_until_the_new_one_is_complete(tmp_path, tiny, corpus):
    out = tmp_path / "idx"
    first = build_index(passages_of(corpus)[:50], tiny, out, progress=False)
    assert len(first) == 50
    second = build_index(passages_of(corpus)[:60], tiny, out, progress=False)
    assert len(second) == 60 and len(first) == 50  # the old handle still reads its (unlinked) files
    assert first.search(first.reconstruct(np.array([[3]]))[0], 1)[1][0, 0] == 3
    folder = tmp_path / "not-an-index"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    with pytest.raises(LatentRagError, match="not a latentrag index"):
        build_index(passages_of(corpus)[:5], tiny, folder, progress=False)
    assert (folder / "precious.txt").exists()


# ---- bad input: errors name the file and line; nothing half-written remains ------------------------------
@pytest.mark.parametrize(
    "content, pattern",
    [
        (b'{"text": "fine words here"}\n{"text": oops}\n', r"bad\.jsonl:2: malformed JSON"),
        (b'{"text": "fine"}\n{"title": "t"}\n', r"bad\.jsonl:2: missing string field 'text'"),
        (b'{"text": "fine"}\n{"text": "\xff"}\n', r"bad\.jsonl:2: not UTF-8"),
        (b'{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', r"bad\.jsonl:2: duplicate id '1'"),
        (b"\n\n", r"bad\.jsonl: empty corpus"),
    ],
)
def test_bad_corpus_fails_the_build_cleanly(tmp_path, tiny, content, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    out = tmp_path / "idx"
    with pytest.raises(LatentRagError, match=pattern):
        build_index(split_passages(read_corpus(path)), tiny, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_cli_reports_bad_input(tmp_path, tiny_dir, capsys):
    from latentrag.cli import main

    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": 1}\n')
    assert main(["index", "build", "--corpus", str(path), "--out", str(tmp_path / "i"), "--encoder",
                 str(tiny_dir), "--quiet"]) == 2
    assert "bad.jsonl:2: missing string field 'text'" in capsys.readouterr().err


# ---- grow and inspect ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "ivf-sq8"])
def test_add_appends_and_refuses_duplicates(tmp_path, tiny, corpus, kind):
    out = tmp_path / "idx"
    base = build_index(passages_of(corpus), tiny, out, index_type=kind, progress=False)
    n = len(base)
    extra = write_corpus(tmp_path / "extra.jsonl", 10, prefix="new-", start=500)
    new = passages_of(extra)
    grown = add_to_index(out, new, tiny, progress=False)
    assert len(grown) == n + len(new) == grown.manifest.count
    assert grown.store.ids()[n:] == [p.id for p in new]
    vectors = encode_passages(tiny, [p.title for p in new], [p.text for p in new])
    np.testing.assert_allclose(grown.reconstruct(np.arange(n, n + len(new))[:, None])[:, 0], vectors, atol=1e-5)
    _, found = grown.search(vectors, 1)
    assert (found[:, 0] >= n).mean() >= 0.9
    with pytest.raises(LatentRagError, match="duplicate passage id 'new-.*already holds it"):
        add_to_index(out, new[:2], tiny, progress=False)
    assert len(DenseIndex.load(out)) == n + len(new)  # unchanged by the refused add
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra.jsonl", "idx"]


def test_add_refuses_another_encoder(tmp_path, tiny, corpus):
    out = tmp_path / "idx"
    build_index(passages_of(corpus)[:20], tiny, out, progress=False)
    other = freeze(DenseEncoder.from_pretrained(str(make_tiny_encoder(tmp_path / "other", seed=1))))
    with pytest.raises(LatentRagError, match="built by document encoder 'tiny-bert-0'"):
        add_to_index(out, [Passage("x", "", "words")], other, progress=False)


def test_cli_add_info_and_plan(tmp_path, tiny_dir, corpus, capsys):
    from latentrag.cli import main

    out = tmp_path / "idx"
    args = ["--corpus", str(corpus), "--encoder", str(tiny_dir), "--passage-words", str(WORDS), "--quiet"]
    assert main(["index", "build", "--out", str(out), "--index-type", "hnsw", *args]) == 0
    extra = write_corpus(tmp_path / "extra.jsonl", 5, prefix="x-", start=700)
    assert main(["index", "add", str(out), "--corpus", str(extra), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n = len(passages_of(corpus)) + len(passages_of(extra))
    assert info["count"] == info["passages"] == n and info["index_type"] == "hnsw"
    assert info["passage_words"] == WORDS and info["params"]["efSearch"] == 192
    assert set(info["files"]) == {"vectors.faiss", "passages.arrow", "manifest.json"}
    assert main(["index", "plan", "--passages", "21000000", "--dim", "768", "--json"]) == 0
    rows = {r["index_type"]: r for r in json.loads(capsys.readouterr().out)["types"]}
    assert rows["flat"]["memory_bytes"] == 4 * 768 * 21_000_000
    assert rows["ivf-pq"]["bytes_per_vector"] == 64 + 8
    assert rows["hnsw-sq8"]["exact_vectors_bytes"] == 4 * 768 * 21_000_000


def test_plan_formulas_match_faiss_serialized_sizes():
    """Within 0.5 %: the formulas leave out only headers and the random HNSW level draw (a few hundred bytes
    at this size; its spread is ~sqrt(N/M) extra links of 4·M bytes: 0.05 % here)."""
    rng = np.random.default_rng(0)
    n, d = 4000, 64
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for kind in INDEX_TYPES:
        params = default_params(kind, n, d)
        index = faiss.index_factory(d, factory_string(kind, params), faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
            faiss.downcast_index(ivf).do_polysemous_training = False
        if not index.is_trained:
            index.train(x[: params["train_size"]])
        index.add(x)
        actual = faiss.serialize_index(index).nbytes
        predicted = memory_bytes(kind, n, d, params)["memory_bytes"]
        assert abs(actual - predicted) / actual < 0.005, (kind, actual, predicted)
    assert plan(21_000_000, 768)["types"][0]["memory_bytes"] == 64_512_000_000


# ---- hot swap -----------------------------------------------------------------------------------------
def test_hot_swap_while_retrieving_and_mismatched_encoder_refused(tmp_path, tiny, tiny_dir, corpus):
    from latentrag.model import RagConfig, RagModel

    a = build_index(passages_of(corpus), tiny, tmp_path / "a", progress=False)
    other_corpus = write_corpus(tmp_path / "b.jsonl", 40, prefix="b-", start=300)
    b = build_index(passages_of(other_corpus), tiny, tmp_path / "b", index_type="hnsw", progress=False)
    query = DenseEncoder.from_pretrained(str(tiny_dir))
    retriever = Retriever(query, tiny.identity(), a)
    model = RagModel(retriever, None, RagConfig())  # the generator plays no part in retrieval
    questions = ["Who wrote about music?", "What is a planet?"]
    seen, errors, stop = [], [], threading.Event()

    def retrieve_forever():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    batch = retriever.retrieve(questions, 3)
                prefixes = {p.id.startswith("b-") for row in batch.passages for p in row}
                assert len(prefixes) == 1, "one call mixed two indexes"
                index = b if prefixes.pop() else a
                np.testing.assert_allclose(batch.doc_vectors.numpy(), index.reconstruct(batch.ids), atol=1e-6)
                seen.append(index is b)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    workers = [threading.Thread(target=retrieve_forever) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        for i in range(6):
            time.sleep(0.05)
            model.swap_index(tmp_path / ("b" if i % 2 == 0 else "a"))
    finally:
        time.sleep(0.05)
        stop.set()
        for worker in workers:
            worker.join()
    assert not errors, errors
    assert len(seen) > 0

    mismatched = make_tiny_encoder(tmp_path / "other", seed=1)
    other = freeze(DenseEncoder.from_pretrained(str(mismatched)))
    c = build_index(passages_of(corpus)[:20], other, tmp_path / "c", progress=False)
    current = retriever.index
    with pytest.raises(LatentRagError, match="built by document encoder 'tiny-bert-1'.*rebuild the index"):
        model.swap_index(c.directory)
    assert retriever.index is current  # the refused index did not replace the current one


# ---- the searcher protocol and pickling ----------------------------------------------------------------
class DelegatingSearcher:
    """Another searcher (as a Ray shard fan-out would be): only the protocol's members, over a DenseIndex."""

    def __init__(self, index):
        self.inner, self.manifest, self.calls = index, index.manifest, 0

    @property
    def dim(self):
        return self.inner.dim

    def __len__(self):
        return len(self.inner)

    def search_with_vectors(self, queries, k):
        self.calls += 1
        return self.inner.search_with_vectors(queries, k)

    def passages(self, ids):
        return self.inner.passages(ids)


def test_search_with_vectors_is_search_plus_reconstruct_and_any_searcher_serves(tmp_path, tiny, tiny_dir, corpus):
    from latentrag.retrieval.searcher import Searcher

    index = build_index(passages_of(corpus), tiny, tmp_path / "hnsw", index_type="hnsw", progress=False)
    queries = tiny.encode(["Who wrote about music?", "What is a planet?"]).numpy()
    scores, ids, vectors = index.search_with_vectors(queries, 4)
    ref_scores, ref_ids = index.search(queries, 4)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores)
    np.testing.assert_array_equal(vectors, index.reconstruct(ids))
    assert isinstance(index, Searcher)

    query = DenseEncoder.from_pretrained(str(tiny_dir))
    other = DelegatingSearcher(index)
    with torch.no_grad():
        ours = Retriever(query, tiny.identity(), index).retrieve(["What is a planet?"], 3)
        theirs = Retriever(query, tiny.identity(), other).retrieve(["What is a planet?"], 3)
    assert other.calls == 1
    np.testing.assert_array_equal(ours.ids, theirs.ids)
    assert torch.equal(ours.scores, theirs.scores) and ours.passages == theirs.passages
    with pytest.raises(LatentRagError, match="not a searcher"):
        Retriever(query, tiny.identity(), object())


def test_index_and_retriever_pickle_and_deepcopy(tmp_path, tiny, tiny_dir, corpus):
    import copy
    import pickle

    index = build_index(passages_of(corpus), tiny, tmp_path / "hnsw", index_type="hnsw", progress=False)
    index.set_search_params(ef_search=7)
    retriever = Retriever(DenseEncoder.from_pretrained(str(tiny_dir)), tiny.identity(), index)
    questions = ["Who wrote about music?", "What is a planet?"]
    with torch.no_grad():
        expected = retriever.retrieve(questions, 5)
    for clone in (pickle.loads(pickle.dumps(retriever)), copy.deepcopy(retriever)):
        assert clone.index is not index and clone.index.search_params == {**index.search_params, "efSearch": 7}
        assert faiss.downcast_index(clone.index.faiss).hnsw.efSearch == 7
        with torch.no_grad():
            got = clone.retrieve(questions, 5)
        np.testing.assert_array_equal(got.ids, expected.ids)
        assert torch.equal(got.scores, expected.scores) and got.passages == expected.passages
    pickled = pickle.dumps(index)
    add_to_index(index.directory, passages_of(write_corpus(tmp_path / "more.jsonl", 3, prefix="m-", start=500)),
                 tiny, progress=False)
    with pytest.raises(LatentRagError, match="changed since this index was pickled"):
        pickle.loads(pickled)


def test_swap_refuses_other_dimension(tmp_path, tiny, tiny_dir, corpus):
    d = build_index(passages_of(corpus)[:10], tiny, tmp_path / "d", progress=False)
    manifest = Manifest.read(d.directory)
    manifest.dim = 16
    manifest.write(d.directory)
    with pytest.raises(LatentRagError, match="rebuild"):
        DenseIndex.load(d.directory)
    retriever = Retriever(DenseEncoder.from_pretrained(str(tiny_dir)), tiny.identity())
    fake = DenseIndex.load(build_index(passages_of(corpus)[:10], tiny, tmp_path / "e", progress=False).directory)
    fake.manifest.dim = 16
    with pytest.raises(LatentRagError, match="dimension 16"):
        retriever.swap_index(fake)


def test_manifest_is_written_last_and_info_reads_it(built):
    directory = built["ivf-pq"].directory
    info = index_info(directory)
    assert info["exact_vectors"] and info["files"][EXACT] == 4 * 32 * info["count"] + 128  # npy header
    assert (directory / MANIFEST).exists()


# ---- the real MiniLM on a few hundred passages ------------------------------------------------------------
@pytest.mark.integration
def test_minilm_index_retrieves_the_right_article(tmp_path):
    encoder = freeze(DenseEncoder.from_pretrained("minilm"))
    corpus = write_corpus(tmp_path / "c.jsonl", 150)
    ps = passages_of(corpus)[:200]
    index = build_index(ps, encoder, tmp_path / "idx", index_type="hnsw", progress=False)
    assert index.manifest.dim == 384 and index.manifest.encoder["name"] == "minilm"
    titles = [p.title for p in ps]
    target = titles[len(titles) // 2]
    q = encoder.encode([f"Tell me about {target}"]).numpy()
    _, ids = index.search(q, 5)
    assert target in [ps[i].title for i in ids[0]]
    reference = encoder.encode([p.title for p in ps[:8]], [p.text for p in ps[:8]]).numpy()
    np.testing.assert_allclose(index.reconstruct(np.arange(8)[:, None])[:, 0], reference, atol=1e-5)


# ---- exact search as GEMM + grouped top-k ----------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 161, 1000, 70_001])
def test_grouped_topk_equals_topk(n):
    from latentrag.retrieval.index.flat_search import _topk_grouped

    scores = torch.randn(6, n, generator=torch.Generator().manual_seed(n))
    for k in (1, 10, 50):
        if k <= n:
            values, ids = _topk_grouped(scores, k)
            ref_values, ref_ids = scores.topk(k, dim=1)
            assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids)


def test_flat_search_matches_faiss(tmp_path):
    from latentrag.retrieval.index import build_index_from_vectors

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16), dtype=np.float32)
    index = build_index_from_vectors(x, (Passage(f"p{i}", "", "") for i in range(3000)), tmp_path / "f",
                                     {"name": "synthetic", "sha256": "0"}, "flat")
    q = rng.standard_normal((40, 16), dtype=np.float32)
    scores, ids = index.search(q, 20)
    ref_scores, ref_ids = index.faiss.search(q, 20)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    with pytest.raises(LatentRagError, match="one vector per passage"):
        build_index_from_vectors(x[:10], [Passage("a", "", "")], tmp_path / "g", {"name": "s", "sha256": "0"})


# ---- bad targets and broken indexes: refused up front, nothing lost ---------------------------------
@pytest.fixture()
def no_encoding(monkeypatch):
    """Fail the test if a build gets as far as loading the document tower (so a refusal came first)."""
    from latentrag.retrieval.index import build as build_module

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was loaded before the target was checked")

    monkeypatch.setattr(build_module.DenseEncoder, "from_pretrained", refuse)


def test_build_refuses_bad_targets_before_encoding(tmp_path, corpus, monkeypatch, capsys, no_encoding):
    from latentrag.cli import main

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("mine")
    monkeypatch.chdir(busy)
    cases = [
        (".", "is the current folder"),
        (str(busy), "is the current folder"),
        (str(tmp_path), "holds it"),
        (str(a_file), "is a file: give a folder"),
        (str(a_file / "sub" / "idx"), "notes.txt is a file, so no index folder can be made under it"),
        (str(tmp_path / "other"), None),  # made below: a non-empty folder that is no index
    ]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("mine")
    for out, message in cases:
        assert main(["index", "build", "--corpus", str(corpus), "--out", out, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert (message or "not a latentrag index: refusing to replace it") in err, (out, err)
        assert "Traceback" not in err
    assert a_file.read_text() == "mine" and (busy / "thesis.tex").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "notes.txt", "other"]
    assert sorted(p.name for p in busy.iterdir()) == ["thesis.tex"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_build_refuses_a_read_only_parent(tmp_path, corpus, no_encoding):
    from latentrag.retrieval.index import build_corpus_index

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(LatentRagError, match="is not writable"):
            build_corpus_index(corpus, locked / "idx", progress=False)
    finally:
        locked.chmod(0o755)


def test_default_build_goes_to_the_cache_one_folder_per_type(tmp_path, tiny_dir, corpus, monkeypatch):
    from latentrag.assets import default_index_dir
    from latentrag.retrieval.index import build_corpus_index

    monkeypatch.setenv("LATENTRAG_CACHE", str(tmp_path / "cache"))
    assert default_index_dir() == tmp_path / "cache" / "indexes" / "wiki-leads-minilm-flat"  # as before
    assert default_index_dir("data/c.jsonl", "hnsw") == tmp_path / "cache" / "indexes" / "c-minilm-hnsw"
    flat = build_corpus_index(corpus, encoder=str(tiny_dir), passage_words=WORDS, progress=False)
    hnsw = build_corpus_index(corpus, index_type="hnsw", encoder=str(tiny_dir), passage_words=WORDS,
                              progress=False)
    name = tiny_dir.name.lower()
    assert flat.directory == tmp_path / "cache" / "indexes" / f"c-{name}-flat"
    assert hnsw.directory == tmp_path / "cache" / "indexes" / f"c-{name}-hnsw"
    assert DenseIndex.load(flat.directory).manifest.index_type == "flat"  # not replaced by the hnsw build
    assert sorted(p.name for p in corpus.parent.iterdir()) == ["c.jsonl"]  # nothing beside the corpus
    assert flat.manifest.corpus == str(corpus.resolve())
    namesake = write_corpus(tmp_path / "c.jsonl", 3)  # another corpus with the same file name
    with pytest.raises(LatentRagError, match="holds the index of another corpus"):
        build_corpus_index(namesake, encoder=str(tiny_dir), passage_words=WORDS, progress=False)
    assert len(DenseIndex.load(flat.directory)) == len(flat)
    rebuilt = build_corpus_index(corpus, encoder=str(tiny_dir), passage_words=WORDS, progress=False)
    assert rebuilt.directory == flat.directory  # the same corpus rebuilds in place


def _corrupt_count(directory: Path) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["count"] += 1
    (directory / MANIFEST).write_text(json.dumps(manifest))


def test_add_to_an_inconsistent_index_changes_nothing(tmp_path, tiny, tiny_dir, corpus, capsys):
    from latentrag.cli import main

    out = tmp_path / "idx"
    build_index(passages_of(corpus)[:20], tiny, out, progress=False)
    _corrupt_count(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    extra = write_corpus(tmp_path / "extra.jsonl", 3, prefix="x-", start=700)
    assert main(["index", "add", str(out), "--corpus", str(extra), "--encoder", str(tiny_dir), "--quiet"]) == 2
    assert "manifest says 21" in capsys.readouterr().err
    with pytest.raises(LatentRagError, match="manifest says 21"):
        add_to_index(out, passages_of(extra), tiny, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra.jsonl", "idx"]


@pytest.mark.parametrize("damage", ["truncate", "count"])
def test_info_reports_a_broken_index(tmp_path, tiny, corpus, capsys, damage):
    from latentrag.cli import main

    out = tmp_path / "idx"
    build_index(passages_of(corpus)[:20], tiny, out, progress=False)
    assert main(["index", "info", str(out)]) == 0
    capsys.readouterr()
    if damage == "truncate":
        size = (out / "vectors.faiss").stat().st_size
        with open(out / "vectors.faiss", "r+b") as f:
            f.truncate(size // 2)
        message = "vectors.faiss: not a readable faiss index"
    else:
        _corrupt_count(out)
        message = "manifest says 21"
    with pytest.raises(LatentRagError, match=message):
        index_info(out)
    assert main(["index", "info", str(out), "--json"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
