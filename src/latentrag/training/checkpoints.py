"""Resumable training checkpoints, as Hugging Face's trainer lays them out: `checkpoint-N/` folders.

    checkpoint-000200/
      trainable.safetensors   the parameters training changes (LoRA adapters, query tower, retrieval scale)
      optimizer.pt            AdamW moments      scheduler.pt   the learning-rate schedule
      rng.pt                  torch (and CUDA) generator states
      state.json              step, examples consumed, python RNG, elapsed seconds

Each folder is written under a temporary name and renamed (`atomic_dir`): a `kill -9` leaves the previous
checkpoint intact and nothing that looks complete. Restoring all of it continues the run bit for bit. A
checkpoint damaged later (a truncated file) is skipped for the newest intact one, with a warning
(`load_newest`). Tensors load onto the CPU first (`map_location`), so a GPU run resumes on a CPU machine.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from latentrag.atomic import atomic_dir
from latentrag.errors import LatentRagError, LatentRagWarning


class UnreadableCheckpoint(LatentRagError):
    """A checkpoint's files cannot be read (truncated, corrupted): an older one may still be intact."""

TRAINABLE, OPTIMIZER, SCHEDULER, RNG, STATE = "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"
PREFIX = "checkpoint-"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (requires_grad), by name: all a checkpoint needs of the model."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, state: dict,
                    keep: int = 2) -> Path:
    from safetensors.torch import save_file

    target = run_dir / f"{PREFIX}{step:06d}"
    with atomic_dir(target) as tmp:
        save_file(trainable_state(model), tmp / TRAINABLE)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / RNG)
        (tmp / STATE).write_text(json.dumps({**state, "step": step, "python_rng": _py_rng()}, indent=2))
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (a temporary folder of an interrupted write is not one)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE).is_file())


def load_trainable(path: Path, model: nn.Module) -> None:
    """Copy a checkpoint's trained parameters into `model` (built with the run's settings)."""
    from safetensors.torch import load_file

    try:
        saved = load_file(path / TRAINABLE)
    except Exception as e:  # safetensors raises its own SafetensorError on a truncated file
        raise UnreadableCheckpoint(f"{path}: unreadable {TRAINABLE} ({e})") from e
    params = dict(model.named_parameters())
    unknown = sorted(set(saved) - set(params))
    missing = sorted(name for name, p in params.items() if p.requires_grad and name not in saved)
    if unknown or missing:
        raise LatentRagError(
            f"{path} does not fit this model ({len(unknown)} unknown, {len(missing)} missing parameters, e.g. "
            f"{(unknown or missing)[:2]}): use the settings the run started with"
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore model parameters, optimiser, schedule and RNG from `path`; return its state (step, position…)."""
    try:  # read everything before changing anything (the optimiser casts its state to the parameters' device)
        optimizer_state = torch.load(path / OPTIMIZER, weights_only=True, map_location="cpu")
        scheduler_state = torch.load(path / SCHEDULER, weights_only=True, map_location="cpu")
        rng = torch.load(path / RNG, weights_only=True, map_location="cpu")
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError, RuntimeError, EOFError, json.JSONDecodeError) as e:
        raise UnreadableCheckpoint(f"{path}: unreadable checkpoint ({e})") from e
    load_trainable(path, model)
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise LatentRagError(f"{path}: the optimiser state does not fit this model ({e}): use the settings the "
                             "run started with") from e
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state


def load_newest(run_dir: Path, load: Callable[[Path], object], paths: list[Path] | None = None):
    """(path, load(path)) for the newest checkpoint that reads; a damaged newer one is skipped with a warning
    naming both. Raises when none is intact."""
    paths = checkpoints(run_dir) if paths is None else paths
    skipped = []
    for path in reversed(paths):
        try:
            result = load(path)
        except UnreadableCheckpoint as e:
            skipped.append(f"{path.name} ({e})")
            continue
        if skipped:
            warnings.warn(f"skipped the damaged checkpoint(s) {'; '.join(skipped)}: using {path.name}, the newest "
                          "intact one (delete the damaged ones once you no longer need them)",
                          LatentRagWarning, stacklevel=2)
        return path, result
    raise LatentRagError(f"no intact checkpoint in {run_dir}: {'; '.join(skipped)}; start the run again without "
                         "--resume in a new --out")


def _py_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
