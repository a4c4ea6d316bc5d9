"""End-to-end fine-tuning on tiny random models: the loss is RagModel's, the document tower and index stay
fixed, gradients reach the query tower only through p(z|x), resume after kill -9 is bit-for-bit, DDP equals
one process, bad input is refused before any work."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import ANSWERS, QUESTIONS, save_tiny_parts, tiny_train_settings

from latentrag.errors import LatentRagError
from latentrag.model import RagModel
from latentrag.training import checkpoints as ckpt
from latentrag.training import train
from latentrag.training.data import ExampleStream, load_pairs
from latentrag.training.trainer import Objective, build_model
from latentrag.training.validation import collapse_warning

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return save_tiny_parts(tmp_path_factory.mktemp("parts"), pairs=40)


_settings = tiny_train_settings


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("generator", ["bart", "llama"])
def test_training_learns_and_writes_a_loadable_model(parts, tmp_path, generator):
    settings = _settings(parts, tmp_path / "run", generator=str(parts / generator), steps=6, eval_every=3)
    index_before = _digest(parts / "index")
    model_dir = train(settings, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    vals = [r["val"] for r in log if "val" in r]
    assert len(vals) == 2 and {"exact_match", "recall@5", "prior_entropy", "distinct_top1"} <= set(vals[0])
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 1000
    assert [p.name for p in ckpt.checkpoints(tmp_path / "run")] == ["checkpoint-000004", "checkpoint-000006"]
    assert _digest(parts / "index") == index_before  # the index is untouched
    # the saved model is the trained one: same loss after loading
    trained = build_model(settings, str(parts / "index"), torch.device("cpu"))
    ckpt_state = load_file(tmp_path / "run" / "checkpoint-000006" / ckpt.TRAINABLE)
    params = dict(trained.named_parameters())
    with torch.no_grad():
        for name, value in ckpt_state.items():
            params[name].copy_(value)
    loaded = RagModel.from_pretrained(model_dir, index=parts / "index")
    trained.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.loss(QUESTIONS, ANSWERS), trained.loss(QUESTIONS, ANSWERS))
    assert loaded.config.mode == "token" and loaded.config.k == 3


def test_document_tower_untouched_and_query_tower_trained(parts, tmp_path):
    settings = _settings(parts, tmp_path / "run", lora_rank=0, query_lora_rank=0, lr=1e-3)
    model = build_model(settings, str(parts / "index"), torch.device("cpu"))
    doc = model.document_encoder()
    doc_before = {k: v.clone() for k, v in doc.state_dict().items()}
    q_before = {k: v.clone() for k, v in model.retriever.query_encoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        model.loss(QUESTIONS, ANSWERS).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, doc.state_dict()[k]) for k, v in doc_before.items())
    assert not all(torch.equal(v, model.retriever.query_encoder.state_dict()[k]) for k, v in q_before.items())
    assert not any(p.requires_grad for p in doc.parameters())


def test_gradient_reaches_the_query_tower_only_through_the_prior(parts, tmp_path):
    settings = _settings(parts, tmp_path / "run", query_lora_rank=0)
    model = build_model(settings, str(parts / "index"), torch.device("cpu"))
    tower = [p for p in model.retriever.query_encoder.parameters() if p.requires_grad]
    retrieved = model.retrieve(QUESTIONS, 3)
    loss = model.loss(QUESTIONS, ANSWERS, retrieved=retrieved)
    grads = torch.autograd.grad(loss, tower, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # the same batch with the scores cut from the graph: the tower receives nothing at all
    retrieved.scores = retrieved.scores.detach()
    loss = model.loss(QUESTIONS, ANSWERS, retrieved=retrieved)
    assert all(g is None for g in torch.autograd.grad(loss, tower, allow_unused=True))


def test_objective_is_the_model_loss(parts, tmp_path):
    settings = _settings(parts, tmp_path / "run", mode="sequence")
    model = build_model(settings, str(parts / "index"), torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(Objective(model, "sequence", 3, False)(QUESTIONS, ANSWERS).mean(),
                                   model.loss(QUESTIONS, ANSWERS, mode="sequence", k=3))


def test_learned_retrieval_scale_trains_and_is_saved(parts, tmp_path):
    settings = _settings(parts, tmp_path / "run", retrieval_scale=5.0, learn_retrieval_scale=True, steps=3,
                         lr=5e-2)
    model_dir = train(settings, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    scale = log[-1].get("scale") or [r["scale"] for r in log if "scale" in r][-1]
    assert scale != pytest.approx(5.0, abs=1e-6)
    loaded = RagModel.from_pretrained(model_dir, index=parts / "index")
    assert float(loaded.retriever.log_scale.exp()) == pytest.approx(scale, rel=1e-5)


def test_closed_book_trains_the_generator_alone(parts, tmp_path):
    train(_settings(parts, tmp_path / "run", closed_book=True, steps=2), progress=False)
    vals = [json.loads(line)["val"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
            if "val" in line]
    assert vals and "recall@5" not in vals[-1]
    saved = load_file(tmp_path / "run" / "checkpoint-000002" / ckpt.TRAINABLE)
    assert saved and all("generator" in name for name in saved)


def _cli(parts, out, *extra, steps=6):
    return [sys.executable, "-m", "latentrag", "--threads", "1", "train", "--train", str(parts / "train.jsonl"),
            "--out", str(out), "--k", "3", "--steps", str(steps), "--batch-size", "2", "--eval-every", "100",
            "--save-every", "2", "--val-fraction", "0.1", "--val-questions", "2", "--max-new-tokens", "3",
            "--index", str(parts / "index"), "--query-encoder", str(parts / "q"), "--document-encoder",
            str(parts / "ctx"), "--generator", str(parts / "bart"), "--lora-rank", "4", "--lr", "1e-2", "--quiet",
            *extra]


def _env():
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_resume_after_kill_9_gives_the_uninterrupted_weights(parts, tmp_path):
    subprocess.run(_cli(parts, tmp_path / "straight"), check=True, env=_env(), capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(parts, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ckpt.checkpoints(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_cli(parts, out, "--resume"), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    final = ckpt.TRAINABLE
    a = load_file(tmp_path / "straight" / "checkpoint-000006" / final)
    b = load_file(out / "checkpoint-000006" / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one record per step after resume


def test_ddp_two_processes_equal_one_with_the_same_global_batch(parts, tmp_path):
    one = subprocess.run(_cli(parts, tmp_path / "one", steps=3), env=_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    cmd = _cli(parts, tmp_path / "two", steps=3)
    cmd[cmd.index("--batch-size") + 1] = "1"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                *cmd[1:]]
    two = subprocess.run(torchrun, env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "checkpoint-000003" / ckpt.TRAINABLE)
    b = load_file(tmp_path / "two" / "checkpoint-000003" / ckpt.TRAINABLE)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)  # padding differs: float noise, Adam-scaled


def test_bad_input_is_refused_before_any_work(parts, tmp_path, monkeypatch):
    import latentrag.training.trainer as trainer

    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: pytest.fail("work started"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LatentRagError, match="no"):
        train(_settings(parts, tmp_path / "a", train=str(empty)), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "answers": ["y"]}\n{not json\n')
    with pytest.raises(LatentRagError, match="bad.jsonl:2"):
        train(_settings(parts, tmp_path / "b", train=str(bad)), progress=False)
    with pytest.raises(LatentRagError, match="larger than the index"):
        train(_settings(parts, tmp_path / "c", k=50), progress=False)
    with pytest.raises(LatentRagError, match="test split"):
        train(_settings(parts, tmp_path / "d", train="nq-test"), progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"mode": "sequence"}))
    with pytest.raises(LatentRagError, match="already holds a training run"):
        train(_settings(parts, other), progress=False)
    with pytest.raises(LatentRagError, match="other settings"):
        train(_settings(parts, other), resume=True, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("mine")
    with pytest.raises(LatentRagError, match="non-empty"):
        train(_settings(parts, tmp_path / "notes"), progress=False)


def test_stream_is_seeded_and_resumes_from_its_position(parts):
    pairs = load_pairs(str(parts / "train.jsonl"))
    a = ExampleStream(pairs, seed=1)
    first = [p.id for p in a.take(57)]  # runs across an epoch boundary
    b = ExampleStream(pairs, seed=1, position=30)
    assert [p.id for p in b.take(27)] == first[30:]
    assert sorted(first[:40]) == sorted(p.id for p in pairs)  # an epoch is a permutation


def test_collapse_warning():
    ok = {"n": 20, "distinct_top1": 0.8, "most_common_top1": 0.1}
    assert collapse_warning([ok]) is None
    assert "collapsing" in collapse_warning([ok, {**ok, "most_common_top1": 0.6}])
    assert "fell" in collapse_warning([ok, {**ok, "distinct_top1": 0.3}])


def test_the_shipped_trained_default_is_what_load_model_loads(parts, tmp_path, monkeypatch):
    import latentrag.assets as assets
    from latentrag.loading import load_model

    model_dir = train(_settings(parts, tmp_path / "run", steps=1), progress=False)
    assert (model_dir / "generator_adapter").is_dir() and not (model_dir / "generator").exists()
    monkeypatch.setattr(assets, "TRAINED_DEFAULT_DIR", model_dir)
    loaded = load_model(index=parts / "index", progress=False)
    assert loaded.config.k == 3 and len(loaded.generator.source.adapters) == 1
    from_class = RagModel.from_pretrained(index=parts / "index")  # the class's loader defaults to it too
    assert len(from_class.generator.source.adapters) == 1
    monkeypatch.setattr(assets, "TRAINED_DEFAULT_DIR", tmp_path / "none")
    assert assets.trained_default_dir() is None


def test_export_a_checkpoint_as_a_model(parts, tmp_path):
    from latentrag.training.trainer import export_checkpoint

    model_dir = train(_settings(parts, tmp_path / "run", steps=4), progress=False)
    exported = export_checkpoint(tmp_path / "run", tmp_path / "exported", step=4)
    final = RagModel.from_pretrained(model_dir, index=parts / "index").eval()
    again = RagModel.from_pretrained(exported, index=parts / "index").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.loss(QUESTIONS, ANSWERS), final.loss(QUESTIONS, ANSWERS))
    with pytest.raises(LatentRagError, match="no checkpoint at step 3"):
        export_checkpoint(tmp_path / "run", tmp_path / "x", step=3)
