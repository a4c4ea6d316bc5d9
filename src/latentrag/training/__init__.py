"""Training: end-to-end fine-tuning of the query tower and the generator (paper §2.4).

`trainer` (settings, the loop, DDP), `data` (pairs, validation split, the resumable stream),
`checkpoints` (atomic, resumable), `validation` (exact match, recall, collapse), `curves` (the PNG).
"""

from latentrag.training.trainer import TrainSettings, train

__all__ = ["TrainSettings", "train"]
