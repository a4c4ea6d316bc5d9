"""Issue 20: training, import and build faults, each a regression test on tiny models — an empty validation
set, the same file for training and validation, a truncated newest checkpoint (resume and export fall back to
the newest intact one and say so), checkpoints loaded onto the CPU, resuming with another number of
processes, the unused pooler of a fully trained query tower, retrieval scores in fp32 under bf16 autocast,
`atomic_dir` durable before its rename, an index edit that spares a build's resumable work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_models import QUESTIONS, save_tiny_parts, tiny_dense_encoder, tiny_train_settings

from latentrag.errors import LatentRagError, LatentRagWarning
from latentrag.retrieval.index import DenseIndex, replace_passages
from latentrag.retrieval.retriever import Retriever
from latentrag.training import checkpoints as ckpt
from latentrag.training import train
from latentrag.training.trainer import _check_world, export_checkpoint
from latentrag.training.validation import validate


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = save_tiny_parts(tmp_path_factory.mktemp("parts"), pairs=20, generators=("bart",))
    with open(root / "unanswerable.jsonl", "w") as f:
        f.write(json.dumps({"id": "u", "question": "What is the airspeed of a swallow?",
                            "answers": ["zyzzyva quokka"]}) + "\n")
    return root


_settings = tiny_train_settings


def test_no_answerable_validation_question_is_a_clear_error_not_a_zero_division(parts, tmp_path):
    with pytest.raises(LatentRagError, match="no question of --val .* has its answer"):
        train(_settings(parts, tmp_path / "run", answerable_only=True, val=str(parts / "unanswerable.jsonl")),
              progress=False)
    assert validate(torch.nn.Linear(1, 1), [], "token", 3) == {"n": 0}  # and validation has nothing to divide by


def test_the_same_file_for_train_and_val_is_refused_clearly(parts, tmp_path):
    with pytest.raises(LatentRagError, match="--train and --val name the same file"):
        train(_settings(parts, tmp_path / "run", val=str(parts / "train.jsonl")), progress=False)


def test_a_truncated_newest_checkpoint_falls_back_to_the_newest_intact_one(parts, tmp_path):
    run = tmp_path / "run"
    settings = _settings(parts, run)
    train(settings, progress=False)
    newest = run / "checkpoint-000004" / ckpt.TRAINABLE
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated

    with pytest.warns(LatentRagWarning, match="checkpoint-000004 .* using checkpoint-000002"):
        export_checkpoint(run, tmp_path / "exported")
    assert (tmp_path / "exported").is_dir()
    with pytest.raises(LatentRagError, match="unreadable"):  # a step asked for by name: no silent substitute
        export_checkpoint(run, tmp_path / "exported4", step=4)

    with pytest.warns(LatentRagWarning, match="skipped the damaged checkpoint.*using checkpoint-000002"):
        train(settings, resume=True, progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]  # steps 3 and 4 trained again
    ckpt.load_trainable(run / "checkpoint-000004", train.__globals__["build_model"](
        settings, DenseIndex.load(parts / "index"), torch.device("cpu")))  # rewritten intact

    for path in run.glob("checkpoint-*/" + ckpt.TRAINABLE):
        path.write_bytes(b"\0" * 10)
    with pytest.raises(LatentRagError, match="no intact checkpoint"):
        train(settings, resume=True, progress=False)


def test_checkpoints_load_onto_the_cpu(parts, tmp_path, monkeypatch):
    """A run saved on a GPU resumes on a CPU machine: every torch.load names map_location."""
    run = tmp_path / "run"
    settings = _settings(parts, run, steps=2)
    train(settings, progress=False)
    seen = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: (seen.append(kw.get("map_location")), load(*a, **kw))[1])
    train(settings, resume=True, progress=False)
    assert seen and all(m == "cpu" for m in seen)


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"world_size": 2, "global_batch": 8}))
    with pytest.raises(LatentRagError, match="trained with 2 process.*resumed with 1.*torchrun --nproc-per-node 2"):
        _check_world(tmp_path, 1, resume=True)
    _check_world(tmp_path, 2, resume=True)  # the same number: fine
    _check_world(tmp_path, 1, resume=False)  # not a resume: _check_out refuses an existing run anyway


def test_a_fully_trained_query_tower_leaves_its_unused_pooler_frozen():
    """DDP refuses parameters that get no gradient: with mean pooling, the pooler is one."""
    tower = tiny_dense_encoder("bert", pooling="mean")
    assert any("pooler" in name for name, _ in tower.model.named_parameters())
    tower.requires_grad_(True)
    trainable = {name: p for name, p in tower.model.named_parameters() if p.requires_grad}
    assert trainable and not any("pooler" in name for name in trainable)
    tower.embed(QUESTIONS[:2]).sum().backward()
    assert all(p.grad is not None for p in trainable.values())  # every trainable parameter gets a gradient
    dpr = tiny_dense_encoder("dpr-question")  # DPR's "pooler" pooling reads its output: nothing is frozen
    dpr.requires_grad_(True)
    assert all(p.requires_grad for p in dpr.model.parameters())


def test_retrieval_scores_are_fp32_under_bf16_autocast(parts):
    context = tiny_dense_encoder("dpr-context", seed=1)
    retriever = Retriever(tiny_dense_encoder("dpr-question", seed=0), context.identity(),
                          DenseIndex.load(parts / "index"), scale=20.0)
    plain = retriever.retrieve(QUESTIONS, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = retriever.retrieve(QUESTIONS, 3)
    assert mixed.scores.dtype == torch.float32 and mixed.doc_vectors.dtype == torch.float32
    assert mixed.log_prior.dtype == torch.float32
    assert (mixed.ids == plain.ids).all()


def test_atomic_dir_fsyncs_its_files_before_the_rename(tmp_path, monkeypatch):
    import latentrag.atomic as atomic

    events = []
    fsync, replace = os.fsync, atomic.replace_dir
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                        fsync(fd))[1])
    monkeypatch.setattr(atomic, "replace_dir", lambda new, d: (events.append(("rename", str(new))), replace(new, d))[1])
    with atomic.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    rename = events.index(next(e for e in events if e[0] == "rename"))
    synced = [Path(path).name for kind, path in events[:rename] if kind == "fsync"]
    assert {"a.bin", "b.bin", "sub"} <= set(synced) and events[rename][1].endswith(".tmp")
    assert (tmp_path / "out" / "sub" / "b.bin").read_bytes() == b"b"


def test_an_edit_spares_the_resumable_work_of_a_build_of_the_same_folder(parts, tmp_path):
    from latentrag.retrieval.encoders import DenseEncoder, freeze

    build_work = tmp_path / ".edited.build"
    build_work.mkdir()
    (build_work / "state.json").write_text("{}")  # an interrupted `build_index` of tmp_path/edited
    context = freeze(DenseEncoder.from_pretrained(str(parts / "ctx")))
    edited = replace_passages(DenseIndex.load(parts / "index"), {"2": "Hamlet is a comedy."}, tmp_path / "edited",
                              context)
    assert edited.store[2].text == "Hamlet is a comedy."
    assert (build_work / "state.json").read_text() == "{}"  # untouched
    assert not (tmp_path / ".edited.edit").exists()  # the edit's own work folder, removed when done
