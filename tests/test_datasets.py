"""QA loaders: the real DPR splits from the pyserini jar (counts as published) and user JSONL/TSV files."""

import importlib.util
import json
import os

import pytest

from latentrag.errors import LatentRagError
from latentrag.evaluation.datasets import DATASETS, QAExample, load_dataset

needs_pyserini = pytest.mark.skipif(
    importlib.util.find_spec("pyserini") is None, reason="pyserini==0.21.0 (the DPR splits) is not installed"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache for this module, so the first load really parses the jar."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("LATENTRAG_CACHE")
    os.environ["LATENTRAG_CACHE"] = str(root)
    yield root
    if old is None:
        del os.environ["LATENTRAG_CACHE"]
    else:
        os.environ["LATENTRAG_CACHE"] = old


@needs_pyserini
@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("nq-dev", 8757),
        ("nq-test", 3610),
        ("trivia-dev", 8837),
        ("trivia-test", 11313),
        ("wq-test", 2032),
        ("curated-test", 694),
        ("squad-test", 10570),
    ],
)
def test_real_split_sizes_and_cache(cache, name, count):
    examples = load_dataset(name)
    assert len(examples) == count == DATASETS[name][1]
    assert all(ex.question.strip() and ex.answers for ex in examples)
    assert all(ex.regex == (name == "curated-test") for ex in examples)
    assert len({ex.id for ex in examples}) == count
    assert (cache / "datasets" / f"{name}.jsonl").is_file()
    assert load_dataset(name) == examples  # second load reads the cache, same result


@needs_pyserini
def test_known_rows_parse_like_dpr(cache):
    first = load_dataset("nq-test", limit=2)
    assert first[0] == QAExample(
        question="who got the first nobel prize in physics",
        answers=["Wilhelm Conrad Röntgen"],
        id="nq-test-0",
    )
    assert len(first) == 2
    curated = load_dataset("curated-test", limit=1)[0]
    assert curated.question == "How tall is Mount McKinley?"
    assert curated.answers[0].startswith(r"20\s?,?\s?(32|40)0")  # a regex, unescaped once
    with pytest.raises(LatentRagError, match="limit must be at least 1"):
        load_dataset("wq-test", limit=0)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_answer_forms(tmp_path):
    path = _write(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"question": "q1", "answers": ["a", "b"]}),
            "",
            json.dumps({"question": "q2", "answer": "c", "id": 7}),
            json.dumps({"question": "q3", "answer": ["d"]}),
            json.dumps({"question": "claim", "label": "SUPPORTS", "regex": False}),
        ],
    )
    examples = load_dataset(str(path))
    assert [ex.answers for ex in examples] == [["a", "b"], ["c"], ["d"], ["SUPPORTS"]]
    assert [ex.id for ex in examples] == ["mine-0", "7", "mine-2", "mine-3"]
    assert load_dataset(path, limit=1) == examples[:1]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "malformed JSON"),
        (json.dumps({"answers": ["a"]}), "missing or empty 'question'"),
        (json.dumps({"question": "q", "answers": []}), "no answers"),
        (json.dumps({"question": "q"}), "no answers"),
        (json.dumps({"question": "q", "answers": [1]}), "no answers"),
        (json.dumps({"question": "q", "answers": ["a", ""]}), "an empty answer"),
        (json.dumps({"question": "q", "answer": "  "}), "an empty answer"),
        (json.dumps({"question": "q", "answers": ["a"], "id": "bad-1"}), "duplicate question id 'bad-1' .first at line 2"),
        (json.dumps(["q", "a"]), "expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"question": "q", "answers": ["a"]})  # numbered bad-0, bad-1, ... by position
    path = _write(tmp_path / "bad.jsonl", [good, good, bad_line, good])
    with pytest.raises(LatentRagError, match=message) as info:
        load_dataset(str(path))
    assert f"{path}:3:" in str(info.value)


def test_dpr_tsv_file(tmp_path):
    path = tmp_path / "qas.tsv"
    path.write_text("who?\t['Ann', \"B'o\"]\nwhen?\t['1990']\n", encoding="utf-8")
    assert [ex.answers for ex in load_dataset(path)] == [["Ann", "B'o"], ["1990"]]
    path.write_text("who?\t['Ann', '']\n", encoding="utf-8")
    with pytest.raises(LatentRagError, match=r"qas\.tsv:1: an empty answer"):
        load_dataset(path)
    path.write_text("who?\t['Ann']\nwhen?\tnot a list\n", encoding="utf-8")
    with pytest.raises(LatentRagError, match=r"qas\.tsv:2: answers must be a Python list"):
        load_dataset(path)


def test_unknown_name_lists_the_known_names():
    with pytest.raises(LatentRagError, match="unknown dataset 'nq-train'") as info:
        load_dataset("nq-train")
    for name in DATASETS:
        assert name in str(info.value)


def test_missing_file_and_bad_limit(tmp_path):
    with pytest.raises(LatentRagError, match="not found"):
        load_dataset(tmp_path / "absent.jsonl")
    for limit in (-1, 0):  # -1 once meant "all but the last" through a slice
        with pytest.raises(LatentRagError, match="limit must be at least 1"):
            load_dataset("nq-test", limit=limit)
