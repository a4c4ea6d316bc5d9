"""Editing an index (`replace_passages`): edited passages re-encoded, every other vector copied bit for bit,
the encoder identity kept so the model accepts the copy, reuse of an unchanged copy, bad input refused."""

import json

import numpy as np
import pytest
from tiny_models import tiny_bart, tiny_dense_encoder, tiny_passages

from latentrag.errors import LatentRagError
from latentrag.model import RagModel
from latentrag.retrieval.corpus import Passage
from latentrag.retrieval.encoders import freeze
from latentrag.retrieval.index import EDITS, DenseIndex, build_index, encode_passages, replace_passages

EDIT = {"2": "Hamlet is a comedy written by Christopher Marlowe around 1590.",
        "7": Passage("7", "Saturn", "Saturn is the largest planet of the Solar System, a gas giant with rings.")}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    tiny_dense_encoder("dpr-question", seed=0).save_pretrained(root / "q")
    context = tiny_dense_encoder("dpr-context", seed=1)
    context.save_pretrained(root / "ctx")
    model, tok = tiny_bart(seed=2)
    model.save_pretrained(root / "gen")
    tok.save_pretrained(root / "gen")
    for kind in ("flat", "hnsw-sq8"):
        build_index(tiny_passages(), context, root / f"index-{kind}", index_type=kind, progress=False)
    return root


@pytest.fixture(scope="module")
def context(parts):
    from latentrag.retrieval.encoders import DenseEncoder

    return freeze(DenseEncoder.from_pretrained(str(parts / "ctx")))


def _all_vectors(index: DenseIndex) -> np.ndarray:
    return index.reconstruct(np.arange(len(index))[None, :])[0]


@pytest.mark.parametrize("kind", ["flat", "hnsw-sq8"])
def test_edited_passages_are_re_encoded_and_every_other_vector_is_copied(parts, context, tmp_path, kind):
    source = DenseIndex.load(parts / f"index-{kind}")
    edited = replace_passages(source, EDIT, tmp_path / "cf", context)
    before, after = _all_vectors(source), _all_vectors(edited)
    assert after.shape == before.shape and len(edited.store) == len(source.store)
    changed = {2, 7}
    for row in range(len(source)):
        old, new = source.store[row], edited.store[row]
        if row in changed:
            want = EDIT[old.id] if isinstance(EDIT[old.id], Passage) else Passage(old.id, old.title, EDIT[old.id])
            assert new == want
            expected = encode_passages(context, [want.title], [want.text])[0]
            np.testing.assert_allclose(after[row], expected, rtol=1e-5, atol=1e-6)
            assert not np.allclose(after[row], before[row], atol=1e-3)
        else:
            assert new == old
            assert np.array_equal(after[row], before[row])  # bit for bit, not re-encoded
    m0, m1 = source.manifest, edited.manifest
    assert m1.encoder == m0.encoder and m1.index_type == m0.index_type and m1.params == m0.params
    assert m1.exact_vectors == m0.exact_vectors and m1.build_id != m0.build_id
    record = json.loads((tmp_path / "cf" / EDITS).read_text())
    assert [e["id"] for e in record["edited"]] == ["2", "7"] and record["source"]["build_id"] == m0.build_id
    # searching the copy finds the new passage by its new vector
    scores, ids = edited.search(after[[2]], 1)
    assert ids[0, 0] == 2


def test_the_model_accepts_the_edited_copy_without_retraining(parts, context, tmp_path):
    model = RagModel.from_components(
        index=parts / "index-flat", query_encoder=str(parts / "q"), document_encoder=str(parts / "ctx"),
        generator=str(parts / "gen"), k=3,
    )
    edited = replace_passages(model.retriever.index, EDIT, tmp_path / "cf", model.document_encoder())
    model.swap_index(edited.directory)
    texts = {p.text for p in model.retrieve(["Who wrote Hamlet?"], k=10).passages[0]}
    assert EDIT["2"] in texts and not any("Shakespeare around 1600" in t for t in texts)
    assert model.generate(["Who wrote Hamlet?"], max_new_tokens=3)[0].passages  # answers from the copy


def test_an_unchanged_request_reuses_the_copy_and_a_changed_one_rebuilds(parts, context, tmp_path):
    first = replace_passages(parts / "index-flat", EDIT, tmp_path / "cf", context)
    again = replace_passages(parts / "index-flat", EDIT, tmp_path / "cf", context)
    assert again.manifest.build_id == first.manifest.build_id
    other = replace_passages(parts / "index-flat", {"2": "Hamlet is a poem."}, tmp_path / "cf", context)
    assert other.manifest.build_id != first.manifest.build_id and other.store[2].text == "Hamlet is a poem."
    forced = replace_passages(parts / "index-flat", {"2": "Hamlet is a poem."}, tmp_path / "cf", context, reuse=False)
    assert forced.manifest.build_id != other.manifest.build_id
    # in place: the folder itself becomes the edited index
    build_index(tiny_passages(), context, tmp_path / "own", progress=False)
    replace_passages(tmp_path / "own", {"0": "Lyon is the capital of France."}, tmp_path / "own", context)
    assert DenseIndex.load(tmp_path / "own").store[0].text == "Lyon is the capital of France."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cf", "own"]  # no work folders left


def test_bad_edits_are_refused_and_leave_nothing(parts, context, tmp_path):
    out = tmp_path / "cf"
    with pytest.raises(LatentRagError, match="not in"):
        replace_passages(parts / "index-flat", {"nope": "text"}, out, context)
    with pytest.raises(LatentRagError, match="no edits"):
        replace_passages(parts / "index-flat", {}, out, context)
    with pytest.raises(LatentRagError, match="ids must match"):
        replace_passages(parts / "index-flat", {"2": Passage("3", "t", "x")}, out, context)
    with pytest.raises(LatentRagError, match="no text"):
        replace_passages(parts / "index-flat", {"2": "  "}, out, context)
    other = tiny_dense_encoder("dpr-context", seed=7)
    with pytest.raises(LatentRagError, match="another space"):
        replace_passages(parts / "index-flat", {"2": "x"}, out, other)
    assert list(tmp_path.iterdir()) == []
