"""The towers read sentence-transformers folders as sentence-transformers does: every pooling mode latentrag
supports gives sentence-transformers' own vectors on a tiny BERT saved by sentence-transformers itself (its
current file format) and by hand (the older flag format); what the tower cannot reproduce is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_models import CORPUS, tiny_bert

from latentrag.errors import LatentRagError
from latentrag.retrieval.encoders import DenseEncoder

# lengths differ, so padding matters for mean, max and last-token pooling
TEXTS = ["Paris", "Who wrote Hamlet?", CORPUS[0], "The Nile is a river in Africa that flows north through Egypt."]
MODES = ["cls", "mean", "max", "lasttoken"]
OLD_TYPES = {"Transformer": "sentence_transformers.models.Transformer",
             "Pooling": "sentence_transformers.models.Pooling",
             "Normalize": "sentence_transformers.models.Normalize"}
OLD_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
             "lasttoken": "pooling_mode_lasttoken", "weightedmean": "pooling_mode_weightedmean_tokens"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    model, tokenizer = tiny_bert(seed=4)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _st_save(hf_dir, out, mode: str, normalize: bool):
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(str(hf_dir))
    modules = [word, models.Pooling(word.get_embedding_dimension(), pooling_mode=mode)]
    SentenceTransformer(modules=modules + [models.Normalize()] * normalize, device="cpu").save(str(out))
    return out


def _old_format(hf_dir, out, modes: list[str], normalize: bool, extra: list[dict] = ()):
    """A folder in the flag format of older sentence-transformers releases (as the bundled MiniLM)."""
    shutil.copytree(hf_dir, out)
    (out / "1_Pooling").mkdir()
    flags = {flag: name in modes for name, flag in OLD_FLAGS.items()}
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    kinds = [("", "Transformer"), ("1_Pooling", "Pooling")] + [("2_Normalize", "Normalize")] * normalize
    entries = [{"idx": i, "name": str(i), "path": p, "type": OLD_TYPES[k]} for i, (p, k) in enumerate(kinds)]
    (out / "modules.json").write_text(json.dumps(entries + list(extra)))
    return out


def _st_vectors(folder):
    from sentence_transformers import SentenceTransformer

    return torch.as_tensor(SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
def test_each_pooling_mode_gives_sentence_transformers_vectors(mode, normalize, hf_dir, tmp_path):
    folder = _st_save(hf_dir, tmp_path / "st", mode, normalize)
    encoder = DenseEncoder.from_pretrained(str(folder))
    assert (encoder.pooling, encoder.normalize) == (mode, normalize)
    ours = encoder.encode(TEXTS)
    torch.testing.assert_close(ours, _st_vectors(folder), rtol=1e-5, atol=1e-5)
    if normalize:
        torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)))


@pytest.mark.parametrize("mode", MODES)
def test_the_older_flag_format_is_read_the_same_way(mode, hf_dir, tmp_path):
    folder = _old_format(hf_dir, tmp_path / "old", [mode], normalize=True)
    encoder = DenseEncoder.from_pretrained(str(folder))
    assert (encoder.pooling, encoder.normalize) == (mode, True)
    reference = DenseEncoder.from_pretrained(str(_st_save(hf_dir, tmp_path / "st", mode, True)))
    torch.testing.assert_close(encoder.encode(TEXTS), reference.encode(TEXTS))


def test_pooling_modes_differ_and_last_token_follows_the_padding(hf_dir):
    """Every mode is its own vector; last-token pooling takes the last real token, also under left padding."""
    vectors = {m: DenseEncoder.from_pretrained(str(hf_dir), pooling=m).encode(TEXTS) for m in MODES}
    for a in MODES:
        for b in MODES[MODES.index(a) + 1:]:
            assert not torch.allclose(vectors[a], vectors[b]), (a, b)
    encoder = DenseEncoder.from_pretrained(str(hf_dir), pooling="lasttoken")
    ids = torch.tensor([[0, 0, 2, 7, 9, 3], [2, 8, 6, 5, 10, 3]])  # row 0 left-padded
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(encoder(ids, mask), hidden[:, -1])
        right = torch.tensor([[2, 7, 9, 3, 0, 0]])
        hidden = encoder.model(input_ids=right, attention_mask=(right != 0).long()).last_hidden_state
        torch.testing.assert_close(encoder(right, (right != 0).long()), hidden[:, 3])


def test_a_pooling_latentrag_cannot_reproduce_is_a_clear_error(hf_dir, tmp_path):
    weighted = _st_save(hf_dir, tmp_path / "weighted", "weightedmean", False)
    with pytest.raises(LatentRagError, match="pooling mode 'weightedmean' is not supported"):
        DenseEncoder.from_pretrained(str(weighted))
    both = _old_format(hf_dir, tmp_path / "both", ["cls", "mean"], normalize=False)
    with pytest.raises(LatentRagError, match="cls \\+ mean concatenated"):
        DenseEncoder.from_pretrained(str(both))
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    with pytest.raises(LatentRagError, match="module 'sentence_transformers.models.Dense' is not supported"):
        DenseEncoder.from_pretrained(str(_old_format(hf_dir, tmp_path / "dense", ["mean"], True, [dense])))
    no_pooling = _old_format(hf_dir, tmp_path / "none", ["mean"], False)
    (no_pooling / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "",
                                                          "type": OLD_TYPES["Transformer"]}]))
    with pytest.raises(LatentRagError, match="no Pooling module"):
        DenseEncoder.from_pretrained(str(no_pooling))
    with pytest.raises(LatentRagError, match="unknown pooling 'sum'"):
        DenseEncoder.from_pretrained(str(hf_dir), pooling="sum")


def test_a_transformer_in_a_subfolder_is_loaded_from_it(hf_dir, tmp_path):
    """Early sentence-transformers releases kept the transformer in its own folder (e.g. 0_BERT)."""
    folder = tmp_path / "nested"
    shutil.copytree(hf_dir, folder / "0_BERT")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_BERT", "type": OLD_TYPES["Transformer"]},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": OLD_TYPES["Pooling"]}]))
    encoder = DenseEncoder.from_pretrained(str(folder))
    flat = DenseEncoder.from_pretrained(str(hf_dir), pooling="mean")
    assert encoder.pooling == "mean" and not encoder.normalize
    torch.testing.assert_close(encoder.encode(TEXTS), flat.encode(TEXTS))


def test_a_plain_encoder_and_a_saved_tower_keep_their_pooling(hf_dir, tmp_path):
    assert DenseEncoder.from_pretrained(str(hf_dir)).pooling == "cls"  # no sentence-transformers files
    tower = DenseEncoder.from_pretrained(str(hf_dir), pooling="max", normalize=True)
    tower.save_pretrained(tmp_path / "saved")
    again = DenseEncoder.from_pretrained(str(tmp_path / "saved"))
    assert (again.pooling, again.normalize) == ("max", True)
    torch.testing.assert_close(again.encode(TEXTS), tower.encode(TEXTS))
