"""Passages: records, corpus readers, splitting into disjoint ~100-word passages, and the on-disk store.

The paper splits Wikipedia into 21M disjoint 100-word passages, each keeping its article title. The store
is an Arrow IPC file read memory-mapped, so looking up k passages touches k rows, not the corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from latentrag.assets import wiki_leads_json
from latentrag.atomic import atomic_path
from latentrag.errors import LatentRagError


@dataclass(frozen=True)
class Passage:
    """One retrievable unit: the latent variable z of the paper."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Document:
    """A source document before splitting."""

    id: str
    title: str
    text: str


def read_wiki_leads() -> Iterator[Document]:
    """The bundled default: lead sections of 10,033 Wikipedia Level-4 vital articles (CC BY-SA 4.0)."""
    data = json.loads(wiki_leads_json().read_text(encoding="utf-8"))
    for key, record in data.items():
        text = (record.get("extract") or "").strip()
        if text:
            yield Document(id=key, title=record.get("title") or key, text=text)


def read_jsonl(path: Path) -> Iterator[Document]:
    """JSON lines with `text` and optional `id`, `title`; errors name the file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise LatentRagError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from e
            except json.JSONDecodeError as e:
                raise LatentRagError(f"{path}:{lineno}: malformed JSON ({e.msg})") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LatentRagError(f"{path}:{lineno}: missing string field 'text'")
            yield Document(
                id=str(record.get("id", f"{path.stem}-{lineno}")), title=str(record.get("title", "")), text=record["text"]
            )


def read_corpus(source: str | Path) -> Iterator[Document]:
    """Documents from a named bundled corpus ('wiki-leads') or a file or folder path."""
    if str(source) == "wiki-leads":
        return read_wiki_leads()
    path = Path(source)
    if not path.exists():
        raise LatentRagError(f"corpus '{source}' not found: give 'wiki-leads' or a path to a .jsonl file")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    raise LatentRagError(f"{path}: unsupported corpus format (expected .jsonl)")


def split_passages(documents: Iterable[Document], words: int = 100) -> Iterator[Passage]:
    """Disjoint passages of `words` words (the last may be shorter), each keeping its document's title.

    A trailing piece shorter than a quarter passage is merged into the previous one, so no passage is a
    few stray words. Ids are `<doc id>#<n>` so a passage can be traced to its source.
    """
    if words < 1:
        raise LatentRagError(f"passage length must be at least 1 word, got {words}")
    for doc in documents:
        tokens = doc.text.split()
        if not tokens:
            continue
        chunks = [tokens[i : i + words] for i in range(0, len(tokens), words)]
        if len(chunks) > 1 and len(chunks[-1]) < max(1, words // 4):
            tail = chunks.pop()
            chunks[-1] = chunks[-1] + tail
        for n, chunk in enumerate(chunks):
            yield Passage(id=f"{doc.id}#{n}", title=doc.title, text=" ".join(chunk))


_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])


def write_passage_store(path: str | Path, passages: Iterable[Passage], batch_rows: int = 65536) -> int:
    """Write passages to an Arrow IPC file atomically; returns the count."""
    count = 0
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:
        buf: list[Passage] = []
        for p in passages:
            buf.append(p)
            if len(buf) >= batch_rows:
                writer.write_batch(_to_batch(buf))
                count += len(buf)
                buf = []
        if buf:
            writer.write_batch(_to_batch(buf))
            count += len(buf)
    return count


def _to_batch(passages: list[Passage]) -> pa.RecordBatch:
    return pa.record_batch(
        [pa.array([p.id for p in passages]), pa.array([p.title for p in passages]), pa.array([p.text for p in passages])],
        schema=_SCHEMA,
    )


class PassageStore:
    """Memory-mapped passages by row number (the row is the faiss id)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._table = pa.ipc.open_file(pa.memory_map(str(self.path), "r")).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise LatentRagError(f"{self.path}: not a readable passage store ({e})") from e
        self._ids, self._titles, self._texts = (self._table.column(c) for c in ("id", "title", "text"))

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, row: int) -> Passage:
        row = int(row)
        return Passage(self._ids[row].as_py(), self._titles[row].as_py(), self._texts[row].as_py())

    def get(self, rows: Iterable[int]) -> list[Passage]:
        return [self[r] for r in rows]

    def __iter__(self) -> Iterator[Passage]:
        for batch in self._table.to_batches():
            for pid, title, text in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
                yield Passage(pid, title, text)
