"""Resumable training checkpoints, as Hugging Face's trainer lays them out: `checkpoint-N/` folders.

    checkpoint-000200/
      trainable.safetensors   the parameters training changes (LoRA adapters, query tower, retrieval scale)
      optimizer.pt            AdamW moments      scheduler.pt   the learning-rate schedule
      rng.pt                  torch (and CUDA) generator states
      state.json              step, examples consumed, python RNG, elapsed seconds

Each folder is written under a temporary name and renamed (`atomic_dir`): a `kill -9` leaves the previous
checkpoint intact and nothing that looks complete. Restoring all of it continues the run bit for bit.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from torch import nn

from latentrag.atomic import atomic_dir
from latentrag.errors import LatentRagError

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

    saved = load_file(path / TRAINABLE)
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
    try:
        load_trainable(path, model)
        optimizer.load_state_dict(torch.load(path / OPTIMIZER, weights_only=True))
        scheduler.load_state_dict(torch.load(path / SCHEDULER, weights_only=True))
        rng = torch.load(path / RNG, weights_only=True)
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise LatentRagError(f"{path}: unreadable checkpoint ({e}); delete it to resume from the one before") from e
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state


def _py_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
