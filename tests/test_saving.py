"""Every way a model is made saves, moves and loads back, trainable (issue 19).

The five origins of a model — `from_components`, `from_pretrained` of a saved full model, of a saved LoRA
model, of a Hugging Face RAG checkpoint, and the shipped default (`from_pretrained()`) — each trained one step
through LoRA adapters and fully, saved, the folder moved elsewhere and loaded from another working directory:
the same loss (1e-6), the same greedy answer, the same input format and the same trainable parameters; and the
training run's checkpoint exports to the same model. Then one regression test per finding of the issue.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_hf_checkpoint import DOC_SEP, PREFIX, TITLE_SEP
from test_hf_checkpoint import save_checkpoint as save_hf_checkpoint
from tiny_models import (
    ANSWERS,
    QUESTIONS,
    save_tiny_parts,
    tiny_passages,
)

from latentrag.errors import LatentRagError
from latentrag.model import RagConfig, RagModel
from latentrag.saving import PARTS_FILE, Base
from latentrag.training import TrainSettings, train
from latentrag.training import checkpoints as ckpt
from latentrag.training.trainer import build_model, export_checkpoint

ORIGINS = ["components-llama", "components-bart", "saved-full", "saved-lora", "hf-rag", "shipped-default"]


def _perturb_adapters(model: RagModel, seed: int = 0) -> None:
    """LoRA's B starts at zero: give the adapters values, so a saved adapter that were lost would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny towers, generators and index in folders; a saved full model, a saved LoRA model, a HF RAG checkpoint."""
    root = save_tiny_parts(tmp_path_factory.mktemp("world"), pairs=12)
    components = dict(query_encoder=str(root / "q"), document_encoder=str(root / "ctx"), generator=str(root / "llama"))
    RagModel.from_components(**components, k=3).save_pretrained(root / "saved-full")
    lora = RagModel.from_components(**components, k=3, retrieval_scale=4.0).set_trainable(generator=4, query_encoder=4)
    _perturb_adapters(lora)
    lora.save_pretrained(root / "saved-lora")
    shutil.copytree(root / "saved-lora", root / "default_model")
    save_hf_checkpoint(root / "hf-rag", "token", 128, 0.1)
    return SimpleNamespace(root=root, index=root / "index", components=components)


def _origin_settings(world, origin: str) -> dict:
    """What TrainSettings names to start from each origin."""
    import latentrag.assets as assets

    if origin == "components-llama":
        return dict(world.components)
    if origin == "components-bart":
        return {**world.components, "generator": str(world.root / "bart")}
    if origin == "hf-rag":
        return {"model": str(world.root / "hf-rag"), "document_encoder": str(world.root / "ctx")}
    if origin == "shipped-default":
        return {"model": str(assets.trained_default_dir())}
    return {"model": str(world.root / origin)}


def _load_origin(world, origin: str) -> RagModel:
    """The origin as a user makes it in Python."""
    if origin.startswith("components"):
        return RagModel.from_components(index=world.index, **_origin_settings(world, origin), k=3)
    if origin == "hf-rag":
        return RagModel.from_pretrained(world.root / "hf-rag", index=world.index, document_encoder=str(world.root / "ctx"))
    if origin == "shipped-default":
        return RagModel.from_pretrained(index=world.index)
    return RagModel.from_pretrained(world.root / origin, index=world.index)


@pytest.fixture
def shipped(world, monkeypatch):
    """The shipped default is a tiny saved LoRA model (as `make train-default` makes the real one)."""
    import latentrag.assets as assets

    monkeypatch.setattr(assets, "TRAINED_DEFAULT_DIR", world.root / "default_model")
    assert assets.trained_default_dir() == world.root / "default_model"


def _trainable(model: RagModel) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _default_trainable(model: RagModel) -> set[str]:
    """What trains by default: every parameter of the query tower and the generator (the scale if learned)."""
    names = {name for name, _ in model.named_parameters() if not name.startswith("document_tower.")}
    return names if model.config.learn_retrieval_scale else names - {"retriever.log_scale"}


def _input_format(model: RagModel) -> tuple:
    passage = tiny_passages()[0]
    return (model.generator.input_format(), model.retriever.query_encoder.settings(),
            [model.generator.input_text(q, passage) for q in QUESTIONS])


def _greedy(model: RagModel) -> list[list[str]]:
    return [a.tokens for a in model.generate(QUESTIONS, mode="token", decoding="greedy", max_new_tokens=4)]


def _assert_same(loaded: RagModel, trained: RagModel) -> None:
    loaded.eval()
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(QUESTIONS, ANSWERS), trained(QUESTIONS, ANSWERS), rtol=1e-6, atol=1e-6)
    assert _greedy(loaded) == _greedy(trained)
    assert _input_format(loaded) == _input_format(trained)
    keep = ("mode", "k", "label_smoothing", "max_input_length", "num_beams", "max_new_tokens",
            "learn_retrieval_scale", "document_encoder_identity")
    assert {f: getattr(loaded.config, f) for f in keep} == {f: getattr(trained.config, f) for f in keep}
    assert loaded.retriever.scale == pytest.approx(trained.retriever.scale, rel=1e-6)


def _move_and_load(folder: Path, tmp_path: Path, monkeypatch, index) -> RagModel:
    """Move the saved folder elsewhere and load it from another working directory."""
    moved = tmp_path / "elsewhere" / "renamed-model"
    moved.parent.mkdir(parents=True)
    shutil.move(str(folder), str(moved))
    (tmp_path / "another-cwd").mkdir()
    monkeypatch.chdir(tmp_path / "another-cwd")
    return RagModel.from_pretrained(moved, index=index)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("origin", ORIGINS)
def test_each_origin_trains_saves_moves_and_loads_back(world, shipped, origin, lora, tmp_path, monkeypatch):
    """The library path (README): build, choose what trains, one optimiser step, save, move, load."""
    model = _load_origin(world, origin)
    assert _trainable(model) == _default_trainable(model)  # trainable as built, whatever the origin
    default_trainable = _trainable(model)
    model.set_trainable(generator=4 if lora else 0, query_encoder=4 if lora else 0)
    if lora:
        _perturb_adapters(model, seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model.loss(QUESTIONS, ANSWERS).backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "saved")
    described = json.loads((tmp_path / "saved" / PARTS_FILE).read_text())["parts"]
    for role, description in described.items():
        if description["base"] is not None:  # only portable bases: asset, hub name or an absolute folder that exists
            assert Base(description["base"]["name"], description["base"]["component"]).portable(), role
            assert Path(description["base"]["name"]).is_absolute()
        assert (description["weights"] is None) == (lora and origin != "saved-full"), role  # adapters over a base
    loaded = _move_and_load(tmp_path / "saved", tmp_path, monkeypatch, world.index)
    _assert_same(loaded, model)
    assert _trainable(loaded) == default_trainable


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("origin", ORIGINS)
def test_each_origin_through_the_trainer_and_export(world, shipped, origin, lora, tmp_path, monkeypatch):
    """`latentrag train` for one step from each origin: its model moves and loads back as the trained model,
    and `export` of its checkpoint gives that model too."""
    settings = TrainSettings(train=str(world.root / "train.jsonl"), out=str(tmp_path / "run"), k=3, steps=1,
                             batch_size=2, eval_every=1, save_every=1, val_fraction=0.2, val_questions=2,
                             max_new_tokens=3, index=str(world.index), lora_rank=4 if lora else 0,
                             lr=1e-2 if lora else 1e-3, **_origin_settings(world, origin))
    model_dir = train(settings, progress=False)
    trained = build_model(settings, str(world.index), torch.device("cpu"))  # the run's model at its checkpoint
    ckpt.load_trainable(ckpt.checkpoints(tmp_path / "run")[-1], trained)
    exported = export_checkpoint(tmp_path / "run", tmp_path / "exported")
    _assert_same(RagModel.from_pretrained(exported, index=world.index), trained)
    loaded = _move_and_load(model_dir, tmp_path, monkeypatch, world.index)
    _assert_same(loaded, trained)
    assert _trainable(loaded) == _default_trainable(loaded)


# ---- the five findings -----------------------------------------------------------------------------------
def test_finding_1_lora_on_a_hf_rag_checkpoint_saves_adapters_over_it_and_keeps_its_input_format(world, tmp_path,
                                                                                                  monkeypatch):
    settings = TrainSettings(train=str(world.root / "train.jsonl"), out=str(tmp_path / "run"), k=3, steps=1,
                             batch_size=2, val_fraction=0.2, val_questions=2, max_new_tokens=3, index=str(world.index),
                             lora_rank=4, lr=1e-2, **_origin_settings(world, "hf-rag"))
    model_dir = train(settings, progress=False)
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "generator_adapter", "generator_question_tokenizer", PARTS_FILE, "query_encoder_adapter", "rag_config.json"]
    parts = json.loads((model_dir / PARTS_FILE).read_text())["parts"]
    assert parts["generator"]["base"] == {"name": str(world.root / "hf-rag"), "component": "generator"}
    assert parts["generator"]["input_format"] == {"kind": "seq2seq", "title_sep": TITLE_SEP, "doc_sep": DOC_SEP,
                                                  "prefix": PREFIX, "question_tokenizer": "generator_question_tokenizer"}
    monkeypatch.chdir(tmp_path)
    loaded = RagModel.from_pretrained(model_dir, index=world.index)
    text = loaded.generator.input_text("What is the Capital of FRANCE?", tiny_passages()[0])
    assert text.startswith(PREFIX + "Paris" + TITLE_SEP) and text.endswith(DOC_SEP + "what is the capital of france?")
    export_checkpoint(tmp_path / "run", tmp_path / "exported")  # exports too

    # a folder an earlier version wrote (base names 'checkpoint#generator', no parts.json) loads with its format
    legacy = tmp_path / "legacy"
    shutil.copytree(model_dir, legacy)
    (legacy / PARTS_FILE).unlink()
    shutil.rmtree(legacy / "generator_question_tokenizer")
    config = json.loads((legacy / "rag_config.json").read_text())
    assert config["generator"] == f"{world.root / 'hf-rag'}#generator"  # what earlier versions wrote, now loadable
    old = RagModel.from_pretrained(legacy, index=world.index)
    assert _input_format(old) == _input_format(loaded)
    with torch.no_grad():
        torch.testing.assert_close(old(QUESTIONS, ANSWERS), loaded(QUESTIONS, ANSWERS))


def test_finding_2_lora_on_a_full_model_named_by_a_relative_path_loads_after_a_move(world, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(world.root / "saved-full", work / "m2")
    monkeypatch.chdir(work)
    settings = TrainSettings(train=str(world.root / "train.jsonl"), out="runs/a", model="m2", k=3, steps=1,
                             batch_size=2, val_fraction=0.2, val_questions=2, max_new_tokens=3,
                             index=str(world.index), lora_rank=4, lr=1e-2)
    model_dir = train(settings, progress=False)
    text = (work / model_dir / PARTS_FILE).read_text()
    assert "m2" not in text  # the weights no portable base describes are saved, not named by a path
    shutil.rmtree(work / "m2")
    loaded = _move_and_load(work / model_dir, tmp_path, monkeypatch, world.index)
    assert loaded.config.k == 3

    # a base folder that is gone is named in our error, not Hugging Face's "check your internet connection"
    lora = tmp_path / "lora"
    shutil.copytree(world.root / "saved-lora", lora)
    parts = json.loads((lora / PARTS_FILE).read_text())
    parts["parts"]["generator"]["base"]["name"] = str(tmp_path / "gone" / "llama")
    (lora / PARTS_FILE).write_text(json.dumps(parts))
    with pytest.raises(LatentRagError, match=r"generator starts from the folder .*gone/llama, which does not exist"):
        RagModel.from_pretrained(lora)
    legacy = tmp_path / "legacy"  # and so in a folder of an earlier version that recorded a relative path
    shutil.copytree(world.root / "saved-lora", legacy)
    (legacy / PARTS_FILE).unlink()
    config = json.loads((legacy / "rag_config.json").read_text())
    (legacy / "rag_config.json").write_text(json.dumps({**config, "generator": "runs/a/model/generator"}))
    with pytest.raises(LatentRagError, match="runs/a/model/generator, which does not exist"):
        RagModel.from_pretrained(legacy)


def test_finding_3_the_shipped_default_trains_what_readme_says(world, shipped):
    model = RagModel.from_pretrained(index=world.index)  # README: the shipped fine-tuned model
    assert len(model.generator.source.adapters) == 1  # loaded from adapters, folded into the base
    loss = model.loss(QUESTIONS[:2], ANSWERS[:2], mode="sequence")
    loss.backward()
    for part in (model.generator, model.retriever.query_encoder):
        params = list(part.parameters())
        assert all(p.requires_grad for p in params)
        assert sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params) > len(params) // 2
    assert not any(p.requires_grad for p in model.document_encoder().parameters())
    saved_full = RagModel.from_pretrained(world.root / "saved-full", index=world.index)
    assert _trainable(saved_full) == _trainable(model) - {"retriever.log_scale"}  # the same whatever the saved form


def test_finding_4_max_input_length_reaches_the_generator_it_trains(world, tmp_path):
    settings = TrainSettings(train=str(world.root / "train.jsonl"), out=str(tmp_path / "run"), k=3, steps=1,
                             batch_size=2, val_fraction=0.2, val_questions=2, max_new_tokens=3, index=str(world.index),
                             model=str(world.root / "saved-full"), max_input_length=110, lora_rank=4, lr=1e-2)
    model = build_model(settings, str(world.index), torch.device("cpu"))
    assert model.generator.max_input_length == 110 and model.config.max_input_length == 110
    retrieved = model.retrieve(QUESTIONS, 3)
    with pytest.warns(Warning, match="max_input_length=110"):
        model.loss(QUESTIONS, ANSWERS, retrieved=retrieved)
    assert model.generator.prepare(retrieved.questions, retrieved.passages).input_ids.shape[1] == 110
    model_dir = train(settings, progress=False)
    loaded = RagModel.from_pretrained(model_dir)
    assert loaded.generator.max_input_length == 110 and loaded.config.max_input_length == 110
    assert RagModel.from_pretrained(model_dir, max_input_length=140).generator.max_input_length == 140


def test_finding_5_nothing_outside_the_model_changes_a_built_model(world):
    import latentrag.training.trainer as trainer

    model = RagModel.from_components(index=world.index, **world.components, k=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.max_input_length = 7  # a built model's settings change only by building it again
    source = inspect.getsource(trainer)  # the trainer builds with overrides and asks the model what trains
    for reach in (r"log_scale\.(fill_|copy_|requires_grad_|data)", r"(generator|query_encoder)\.model\b",
                  r"add_lora\(", r"setattr\(\s*model", r"model\.config\.\w+\s*=[^=]"):
        assert not re.search(reach, source), reach
    model.set_trainable(generator=None, query_encoder=0, retrieval_scale=True)
    assert _trainable(model) == {n for n in _default_trainable(model) if n.startswith("retriever.")} | {
        "retriever.log_scale"}
    with pytest.raises(LatentRagError, match="unknown RagConfig field"):
        RagModel.from_pretrained(world.root / "saved-full", max_input_lenght=3)
    with pytest.raises(LatentRagError, match="names its own document encoder"):
        RagModel.from_pretrained(world.root / "saved-full", document_encoder=str(world.root / "ctx"))


def test_the_service_opens_indexes_through_any_searcher(world, tmp_path):
    """`serve` is not tied to DenseIndex: the service opens every index with the opener it is given (a Ray
    fan-out with --ray: tests/test_sharded.py serves a sharded index)."""
    from latentrag.retrieval.index import DenseIndex
    from latentrag.serving.service import RagService

    class Wrapped:  # any Searcher: the protocol, nothing else
        def __init__(self, directory):
            self.inner, self.opened = DenseIndex.load(directory), directory

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __len__(self):
            return len(self.inner)

    root = tmp_path / "indexes"
    root.mkdir()
    shutil.copytree(world.index, root / "facts")
    model = RagModel.from_components(**world.components, config=RagConfig(k=3, max_new_tokens=3))
    service = RagService(model, root, "facts", admin_token="", open_index=Wrapped)
    assert isinstance(service.active.index, Wrapped) and model.retriever.index is service.active.index
    answers, active, _ = service.answer_batch(QUESTIONS[:2], service.settings(_ask("Who wrote Hamlet?")))
    assert active.name == "facts" and len(answers) == 2


def _ask(question: str):
    from latentrag.serving.schemas import AskRequest

    return AskRequest(question=question)


def test_checkpoint_parameters_are_those_that_train(world, tmp_path):
    """The run's checkpoint holds exactly the parameters `set_trainable` left trainable (what export reloads)."""
    settings = TrainSettings(train=str(world.root / "train.jsonl"), out=str(tmp_path / "run"), k=3, steps=1,
                             batch_size=2, val_fraction=0.2, val_questions=2, max_new_tokens=3, index=str(world.index),
                             freeze_query_encoder=True, lora_rank=4, lr=1e-2, **world.components)
    train(settings, progress=False)
    saved = load_file(ckpt.checkpoints(tmp_path / "run")[-1] / ckpt.TRAINABLE)
    assert saved and all(name.startswith("generator.") and "lora_" in name for name in saved)
