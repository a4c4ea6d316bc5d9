"""Passages: records, corpus readers, splitting into disjoint ~100-word passages, and the on-disk store.

The paper splits Wikipedia into 21M disjoint 100-word passages, each keeping its article title. The store
is an Arrow IPC file read memory-mapped, so looking up k passages touches k rows, not the corpus.

Readers (`read_corpus`):

    wiki-leads           the bundled lead sections of 10,033 Wikipedia vital articles
    *.jsonl / *.ndjson   one JSON object a line: `text`, optional `id`, `title`
    *.tsv / *.csv        a header row naming `text` and optionally `id`, `title` (DPR's psgs_w100.tsv works)
    a folder             every *.txt / *.md file below it; id = relative path, title = file name

Every error a bad file causes is a `LatentRagError` naming the file and the line (and byte offset for
bytes that are not UTF-8): malformed JSON, a missing `text`, duplicate ids, an empty corpus.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from latentrag.assets import wiki_leads_json
from latentrag.atomic import atomic_path
from latentrag.defaults import PASSAGE_WORDS
from latentrag.errors import LatentRagError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TABLE_DELIMITERS = {".tsv": "\t", ".csv": ","}


@dataclass(frozen=True)
class Passage:
    """One retrievable unit: the latent variable z of the paper."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Document:
    """A source document before splitting; `where` says where it came from (file:line) for error messages."""

    id: str
    title: str
    text: str
    where: str = field(default="", compare=False)


# ---- readers ------------------------------------------------------------------------------------------
def read_wiki_leads() -> Iterator[Document]:
    """The bundled default: lead sections of 10,033 Wikipedia Level-4 vital articles (CC BY-SA 4.0)."""
    path = wiki_leads_json()
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, record in data.items():
        text = (record.get("extract") or "").strip()
        if text:
            yield Document(id=key, title=record.get("title") or key, text=text, where=f"{path}[{key!r}]")


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) for each line; bytes that are not UTF-8 raise naming the line and offset."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LatentRagError(
                    f"{path}:{lineno}: not UTF-8 ({e.reason}, byte 0x{raw[e.start]:02x} at byte offset "
                    f"{offset + e.start} of the file); re-encode the file as UTF-8"
                ) from e
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            offset += len(raw)
            yield lineno, line


def json_records(numbered_lines: Iterable[tuple[int, str]], where: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank JSON line; malformed JSON names the file and line."""
    for lineno, line in numbered_lines:
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise LatentRagError(f"{where}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from e


def read_jsonl(path: Path) -> Iterator[Document]:
    """JSON lines with `text` and optional `id`, `title`; errors name the file and line."""
    path = Path(path)
    for lineno, record in json_records(_utf8_lines(path), path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LatentRagError(f"{path}:{lineno}: missing string field 'text' (each line needs {{\"text\": ...}})")
        title = record.get("title")
        yield Document(
            id=str(record["id"]) if record.get("id") is not None else f"{path.stem}-{lineno}",
            title="" if title is None else str(title),
            text=record["text"],
            where=f"{path}:{lineno}",
        )


def read_table(path: Path, delimiter: str | None = None) -> Iterator[Document]:
    """TSV/CSV with a header naming `text` (and optionally `id`, `title`); quoted fields may span lines."""
    path = Path(path)
    delimiter = delimiter or TABLE_DELIMITERS.get(path.suffix.lower(), ",")
    csv.field_size_limit(sys.maxsize)
    lines = _utf8_lines(path)
    reader = csv.reader((line for _, line in lines), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise LatentRagError(f"{path}: empty corpus (no header row, no documents)")
        columns = {name.strip().lower(): i for i, name in enumerate(header)}
        if "text" not in columns:
            raise LatentRagError(
                f"{path}:1: missing column 'text' in the header {header!r} (expected text and optionally id, title)"
            )
        ti, ii, hi = columns["text"], columns.get("id"), columns.get("title")
        for row in reader:
            lineno = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise LatentRagError(f"{path}:{lineno}: {len(row)} fields where the header has {len(header)}")
            yield Document(
                id=row[ii] if ii is not None and row[ii] != "" else f"{path.stem}-{lineno}",
                title=row[hi] if hi is not None else "",
                text=row[ti],
                where=f"{path}:{lineno}",
            )
    except csv.Error as e:
        raise LatentRagError(f"{path}:{reader.line_num}: malformed {path.suffix.lstrip('.').upper()} ({e})") from e


def _title_from_name(path: Path) -> str:
    return path.stem.replace("_", " ").strip()


def _read_text_file(path: Path, doc_id: str) -> Document:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LatentRagError(
            f"{path}:{line}: not UTF-8 ({e.reason}, byte 0x{raw[e.start]:02x} at byte offset {e.start}); "
            "re-encode the file as UTF-8"
        ) from e
    return Document(id=doc_id, title=_title_from_name(path), text=text, where=str(path))


def read_folder(folder: Path) -> Iterator[Document]:
    """Every .txt/.md file below `folder` (sorted), one document each: id = relative path, title = file name."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
    for path in files:
        yield _read_text_file(path, path.relative_to(folder).as_posix())


def _checked(documents: Iterable[Document], source: str) -> Iterator[Document]:
    """Refuse duplicate ids (naming both places) and an empty corpus."""
    seen: dict[str, str] = {}
    count = 0
    for doc in documents:
        first = seen.get(doc.id)
        if first is not None:
            raise LatentRagError(f"{doc.where}: duplicate id '{doc.id}' (first seen at {first}); ids must be unique")
        seen[doc.id] = doc.where or "?"
        if doc.text.strip():
            count += 1
        yield doc
    if count == 0:
        raise LatentRagError(f"{source}: empty corpus (no document with any text): nothing to index")


def read_corpus(source: str | Path) -> Iterator[Document]:
    """Documents from a named bundled corpus ('wiki-leads') or a file or folder path, checked lazily.

    Errors (bad JSON, missing `text`, bytes that are not UTF-8, duplicate ids, an empty corpus) raise a
    `LatentRagError` naming the file and line when the offending document is reached.
    """
    if str(source) == "wiki-leads":
        return _checked(read_wiki_leads(), "wiki-leads")
    path = Path(source).expanduser()
    if not path.exists():
        raise LatentRagError(
            f"corpus '{source}' not found: give 'wiki-leads', a .jsonl/.tsv/.csv file or a folder of .txt/.md files"
        )
    if path.is_dir():
        return _checked(read_folder(path), str(path))
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _checked(read_jsonl(path), str(path))
    if suffix in TABLE_DELIMITERS:
        return _checked(read_table(path), str(path))
    if suffix in TEXT_SUFFIXES:
        return _checked(iter([_read_text_file(path, path.name)]), str(path))
    raise LatentRagError(
        f"{path}: unsupported corpus format '{path.suffix}' (expected .jsonl, .tsv, .csv, .txt/.md or a folder)"
    )


# ---- splitting ----------------------------------------------------------------------------------------
def split_passages(documents: Iterable[Document], words: int = PASSAGE_WORDS) -> Iterator[Passage]:
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


# ---- the store ----------------------------------------------------------------------------------------
_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])


def passage_digest(digest: hashlib._Hash, passage: Passage) -> None:
    """Feed one passage into a running hash (the corpus fingerprint a resumed build checks)."""
    for part in (passage.id, passage.title, passage.text):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)


def write_passage_store(
    path: str | Path,
    passages: Iterable[Passage],
    batch_rows: int = 65536,
    prefix: PassageStore | None = None,
) -> int:
    """Write passages (after the rows of `prefix`, if given) to an Arrow IPC file atomically; returns the count."""
    count = 0
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:
        if prefix is not None:
            for batch in prefix.table.to_batches():
                writer.write_batch(batch)
                count += batch.num_rows
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
        [
            pa.array([p.id for p in passages], pa.string()),
            pa.array([p.title for p in passages], pa.string()),
            pa.array([p.text for p in passages], pa.string()),
        ],
        schema=_SCHEMA,
    )


class PassageStore:
    """Memory-mapped passages by row number (the row is the faiss id).

    Opening maps the Arrow file without reading it; a lookup of k rows touches those k rows only, and
    processes that open the same store share its pages through the OS page cache.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.table = pa.ipc.open_file(pa.memory_map(str(self.path), "r")).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise LatentRagError(f"{self.path}: not a readable passage store ({e})") from e
        if self.table.schema.names[:3] != ["id", "title", "text"]:
            raise LatentRagError(f"{self.path}: not a passage store (columns {self.table.schema.names})")

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, row: int) -> Passage:
        return self.get([row])[0]

    def get(self, rows: Iterable[int]) -> list[Passage]:
        """Passages at the given rows, in that order."""
        rows = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise LatentRagError(f"passage rows {rows.tolist()} out of range for a store of {len(self)}")
        taken = self.table.take(pa.array(rows))
        ids, titles, texts = (taken.column(c).to_pylist() for c in ("id", "title", "text"))
        return [Passage(i, t, x) for i, t, x in zip(ids, titles, texts, strict=True)]

    def slice(self, start: int, stop: int) -> tuple[list[str], list[str]]:
        """(titles, texts) of rows start..stop-1, for encoding a chunk."""
        part = self.table.slice(start, max(0, stop - start))
        return part.column("title").to_pylist(), part.column("text").to_pylist()

    def ids(self) -> list[str]:
        return self.table.column("id").to_pylist()

    def __iter__(self) -> Iterator[Passage]:
        for batch in self.table.to_batches():
            for pid, title, text in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
                yield Passage(pid, title, text)
