"""Open-domain QA data: the DPR splits the paper evaluates on, read offline, and user JSONL files.

The DPR question/answer splits ship inside the pyserini 0.21.0 wheel (its Anserini jar is a zip). Reading
that 150 MB jar is slow, so each parsed split is cached once as JSONL under `cache_dir()/datasets/`.
No train splits ship: train on the dev splits, report on the test splits.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from latentrag.assets import cache_dir, pyserini_jar
from latentrag.atomic import atomic_write_text
from latentrag.errors import LatentRagError
from latentrag.retrieval.corpus import json_records


@dataclass
class QAExample:
    """One question with every accepted answer; `regex` marks CuratedTrec answers, which are patterns."""

    question: str
    answers: list[str]
    regex: bool = False
    id: str = ""


# name -> (file inside the pyserini jar's topics-and-qrels/, questions, what it is for)
DATASETS: dict[str, tuple[str, int, str]] = {
    "nq-dev": ("topics.dpr.nq.dev.txt", 8757, "Natural Questions dev: train/validate on it"),
    "nq-test": ("topics.dpr.nq.test.txt", 3610, "Natural Questions test"),
    "trivia-dev": ("topics.dpr.trivia.dev.txt", 8837, "TriviaQA dev: train/validate on it"),
    "trivia-test": ("topics.dpr.trivia.test.txt", 11313, "TriviaQA test"),
    "wq-test": ("topics.dpr.wq.test.txt", 2032, "WebQuestions test"),
    "curated-test": ("topics.dpr.curated.test.txt", 694, "CuratedTrec test; answers are regular expressions"),
    "squad-test": ("topics.dpr.squad.test.txt", 10570, "SQuAD v1.1 dev, used as an open-domain test set"),
}
_REGEX_DATASETS = {"curated-test"}
_JAR_FOLDER = "topics-and-qrels/"
_TABLE_SUFFIXES = {".csv", ".tsv"}


def load_dataset(name_or_path: str | Path, limit: int | None = None) -> list[QAExample]:
    """The first `limit` examples (all if None) of a named DPR split or of a .jsonl/.tsv file of questions."""
    if limit is not None and limit < 1:
        raise LatentRagError(f"limit must be at least 1 example (or None for all), got {limit}")
    name = str(name_or_path)
    if name in DATASETS:
        examples = _load_named(name)
    else:
        path = Path(name_or_path).expanduser()
        if path.suffix not in {".jsonl", *_TABLE_SUFFIXES} and not path.exists():
            known = ", ".join(DATASETS)
            raise LatentRagError(
                f"unknown dataset '{name}': use one of {known}, or a path to a .jsonl file of questions"
            )
        if not path.is_file():
            raise LatentRagError(f"dataset file {path} not found: check the path")
        if path.suffix in _TABLE_SUFFIXES:
            examples = list(_read_table(path.read_text(encoding="utf-8"), str(path), path.stem))
        else:
            examples = list(_read_jsonl(path))
    return examples if limit is None else examples[:limit]


def _load_named(name: str) -> list[QAExample]:
    """A DPR split from the cache, or parsed out of the pyserini jar and cached."""
    cached = cache_dir() / "datasets" / f"{name}.jsonl"
    if cached.is_file():
        return list(_read_jsonl(cached))
    filename = DATASETS[name][0]
    jar = pyserini_jar()
    try:
        with zipfile.ZipFile(jar) as z:
            text = z.read(_JAR_FOLDER + filename).decode("utf-8")
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise LatentRagError(
            f"cannot read {_JAR_FOLDER}{filename} from {jar} ({e}): reinstall it with "
            "`pip install --no-deps --force-reinstall pyserini==0.21.0`"
        ) from e
    where = f"{jar}!{filename}"
    if text.lstrip().startswith("{"):  # wq, curated and squad ship as JSON lines
        examples = list(_parse_jsonl(io.StringIO(text), where, name))
    else:
        examples = list(_read_table(text, where, name))
    if name in _REGEX_DATASETS:
        for ex in examples:
            ex.regex = True
    try:
        atomic_write_text(
            cached, "".join(json.dumps(asdict(ex), ensure_ascii=False) + "\n" for ex in examples)
        )
    except OSError as e:  # a read-only cache costs speed, not correctness
        warnings.warn(
            f"could not cache {name} at {cached} ({e}); it will be re-read from the jar", stacklevel=3
        )
    return examples


def _read_table(text: str, where: str, stem: str) -> Iterator[QAExample]:
    """DPR's `question<TAB>python-list-of-answers` rows, parsed as DPR does (csv quoting, literal_eval)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    index, end, seen = 0, 0, {}
    for row in reader:
        lineno, end = end + 1, reader.line_num  # a quoted question may span several lines
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) < 2:
            raise LatentRagError(f"{where}:{lineno}: expected 'question<TAB>[answers]', found no tab")
        try:
            answers = ast.literal_eval(row[1])
        except (ValueError, SyntaxError) as e:
            raise LatentRagError(
                f"{where}:{lineno}: answers must be a Python list of strings, e.g. ['Paris'] ({e})"
            ) from e
        yield _unique(_example({"question": row[0], "answers": answers}, where, lineno, f"{stem}-{index}"),
                      seen, where, lineno)
        index += 1


def _read_jsonl(path: Path) -> Iterator[QAExample]:
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            yield from _parse_jsonl(f, str(path), path.stem)
        except UnicodeDecodeError as e:
            raise LatentRagError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}): save it as UTF-8") from e


def _parse_jsonl(lines: Iterable[str], where: str, stem: str) -> Iterator[QAExample]:
    """JSON lines with `question` and `answers` (list), `answer` (string or list) or `label` (string)."""
    seen: dict[str, int] = {}
    for index, (lineno, record) in enumerate(json_records(enumerate(lines, start=1), where)):
        if not isinstance(record, dict):
            raise LatentRagError(f"{where}:{lineno}: expected a JSON object with 'question' and 'answers'")
        yield _unique(_example(record, where, lineno, f"{stem}-{index}"), seen, where, lineno)


def _unique(example: QAExample, seen: dict[str, int], where: str, lineno: int) -> QAExample:
    """Refuse a repeated question id: runs, resumes and re-scoring key predictions by id, so a repeat would
    count one question twice and drop the other."""
    first = seen.setdefault(example.id, lineno)
    if first != lineno:
        raise LatentRagError(
            f"{where}:{lineno}: duplicate question id '{example.id}' (first at line {first}): give every "
            "question its own id, or leave 'id' out to number them"
        )
    return example


def _example(record: dict, where: str, lineno: int, default_id: str) -> QAExample:
    """Validate one record: a non-empty question and at least one answer string."""
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise LatentRagError(f"{where}:{lineno}: missing or empty 'question' (a non-empty string)")
    key = next((k for k in ("answers", "answer", "label") if k in record), None)
    answers = record.get(key) if key else None
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise LatentRagError(
            f"{where}:{lineno}: no answers: give 'answers' (a non-empty list of strings), "
            "'answer' (a string or list) or 'label' (a string)"
        )
    if not all(a.strip() for a in answers):
        raise LatentRagError(
            f"{where}:{lineno}: an empty answer in {answers!r}: every answer must be a non-empty string "
            "(an empty gold would match an empty prediction)"
        )
    regex = record.get("regex", False)
    if not isinstance(regex, bool):
        raise LatentRagError(f"{where}:{lineno}: 'regex' must be true or false")
    return QAExample(question=question, answers=answers, regex=regex, id=str(record.get("id", default_id)))
