"""Corpus readers, passage splitting and the memory-mapped passage store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import (
    Document,
    Passage,
    PassageStore,
    read_corpus,
    split_passages,
    write_passage_store,
)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---- readers ------------------------------------------------------------------------------------------
def test_jsonl_reads_text_id_title_and_defaults(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "title": "A", "text": "alpha beta"}, {"text": "gamma"}])
    docs = list(read_corpus(path))
    assert [(d.id, d.title, d.text) for d in docs] == [("a", "A", "alpha beta"), ("c-2", "", "gamma")]


def test_tsv_and_csv_with_header_quoted_fields_and_any_column_order(tmp_path):
    tsv = tmp_path / "c.tsv"
    tsv.write_text('id\ttext\ttitle\n1\t"he said ""hi""\tthere"\tGreeting\n2\tplain text\tPlain\n', encoding="utf-8")
    docs = list(read_corpus(tsv))
    assert [(d.id, d.title, d.text) for d in docs] == [("1", "Greeting", 'he said "hi"\tthere'), ("2", "Plain", "plain text")]
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('title,text\nT,"two\nlines"\nU,one\n', encoding="utf-8")
    docs = list(read_corpus(csv_path))
    assert [(d.title, d.text) for d in docs] == [("T", "two\nlines"), ("U", "one")]
    assert docs[1].where.endswith("c.csv:4")  # the line the record ends on, after a two-line field


def test_folder_of_text_files_titles_from_names(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "Ada_Lovelace.txt").write_text("first programmer", encoding="utf-8")
    (tmp_path / "sub" / "notes.md").write_text("# Notes\nsome notes", encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    docs = list(read_corpus(tmp_path))
    assert [(d.id, d.title) for d in docs] == [("Ada_Lovelace.txt", "Ada Lovelace"), ("sub/notes.md", "notes")]


def test_wiki_leads_bundled_corpus():
    docs = read_corpus("wiki-leads")
    first = [next(docs) for _ in range(3)]
    assert all(d.text and d.title for d in first)


# ---- bad input: every error names the file and the line ------------------------------------------------
@pytest.mark.parametrize(
    "content, pattern",
    [
        (b'{"text": "ok"}\n{"text": "broken"\n', r"c\.jsonl:2: malformed JSON"),
        (b'{"text": "ok"}\n\n{"title": "no text"}\n', r"c\.jsonl:3: missing string field 'text'"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"c\.jsonl:2: not UTF-8 .* byte offset 28"),  # 15 + len(b'{"text": "caf')
        (b'{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', r"c\.jsonl:2: duplicate id 'x' \(first seen at .*c\.jsonl:1\)"),
        (b"", r"c\.jsonl: empty corpus"),
        (b'{"text": "   "}\n', r"c\.jsonl: empty corpus"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, pattern):
    path = tmp_path / "c.jsonl"
    path.write_bytes(content)
    with pytest.raises(LatentRagError, match=pattern):
        list(read_corpus(path))


def test_table_errors(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("id\ttitle\n1\tT\n", encoding="utf-8")
    with pytest.raises(LatentRagError, match=r"c\.tsv:1: missing column 'text'"):
        list(read_corpus(path))
    path.write_bytes(b"id\ttext\n1\tgood\n2\tbad \xff byte\n")
    with pytest.raises(LatentRagError, match=r"c\.tsv:3: not UTF-8 .*byte 0xff at byte offset 21"):
        list(read_corpus(path))
    path.write_text("id\ttext\n1\ta\textra\n", encoding="utf-8")
    with pytest.raises(LatentRagError, match=r"c\.tsv:2: 3 fields where the header has 2"):
        list(read_corpus(path))
    path.write_text("id\ttext\n", encoding="utf-8")
    with pytest.raises(LatentRagError, match="empty corpus"):
        list(read_corpus(path))


def test_folder_errors(tmp_path):
    with pytest.raises(LatentRagError, match="empty corpus"):
        list(read_corpus(tmp_path))
    (tmp_path / "a.txt").write_bytes(b"line one\nline \xc3\x28 two\n")
    with pytest.raises(LatentRagError, match=r"a\.txt:2: not UTF-8 .* byte offset 14"):
        list(read_corpus(tmp_path))


def test_unknown_source_and_format(tmp_path):
    with pytest.raises(LatentRagError, match="not found"):
        read_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "c.parquet").write_bytes(b"x")
    with pytest.raises(LatentRagError, match="unsupported corpus format"):
        read_corpus(tmp_path / "c.parquet")


# ---- splitting ----------------------------------------------------------------------------------------
def test_split_passages_disjoint_cover_every_word_and_keep_title():
    words = [f"w{i}" for i in range(230)]
    doc = Document("d", "Title", " ".join(words))
    passages = list(split_passages([doc], words=100))
    assert [p.id for p in passages] == ["d#0", "d#1", "d#2"]
    assert all(p.title == "Title" for p in passages)
    assert " ".join(p.text for p in passages).split() == words  # disjoint and complete, in order
    assert [len(p.text.split()) for p in passages] == [100, 100, 30]


def test_split_merges_a_short_tail_and_skips_empty_documents():
    doc = Document("d", "", " ".join(["x"] * 110))
    assert [len(p.text.split()) for p in split_passages([doc, Document("e", "", "  ")], words=100)] == [110]
    with pytest.raises(LatentRagError, match="at least 1 word"):
        list(split_passages([doc], words=0))


# ---- the store ----------------------------------------------------------------------------------------
def test_passage_store_roundtrip_rows_and_slices(tmp_path):
    passages = [Passage(f"p{i}", f"T{i % 3}", f"text {i} é") for i in range(10)]
    path = tmp_path / "passages.arrow"
    assert write_passage_store(path, passages, batch_rows=4) == 10
    store = PassageStore(path)
    assert len(store) == 10 and list(store) == passages
    assert store.get([7, 2, 7]) == [passages[7], passages[2], passages[7]]
    assert store[9] == passages[9]
    assert store.slice(3, 6) == ([p.title for p in passages[3:6]], [p.text for p in passages[3:6]])
    assert store.ids() == [p.id for p in passages]
    with pytest.raises(LatentRagError, match="out of range"):
        store.get([10])
    grown = tmp_path / "grown.arrow"
    assert write_passage_store(grown, [Passage("new", "", "x")], prefix=store) == 11
    assert PassageStore(grown)[10].id == "new" and PassageStore(grown)[0] == passages[0]
    assert not [p for p in tmp_path.iterdir() if re.search(r"\.tmp$", p.name)]  # no temporary left behind


def test_passage_store_refuses_garbage(tmp_path):
    path = tmp_path / "passages.arrow"
    path.write_bytes(b"not arrow")
    with pytest.raises(LatentRagError, match="not a readable passage store"):
        PassageStore(path)
