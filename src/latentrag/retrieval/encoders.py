"""The two towers of the bi-encoder: q(x) = BERT_q(x) and d(z) = BERT_d(z) (paper §2.2, DPR).

Any Hugging Face encoder works; a tower is the chain transformer → pooling (CLS, mean, or the model's own
pooler for DPR checkpoints) → optional L2 normalisation, as in sentence-transformers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from latentrag.assets import resolve_encoder
from latentrag.errors import LatentRagError

POOLINGS = ("cls", "mean", "pooler")
_TOWER_FILE = "latentrag_encoder.json"


def _detect_pooling(path: Path, model_type: str) -> tuple[str, bool]:
    """Pooling and normalisation a checkpoint declares: DPR uses its pooler, sentence-transformers its config."""
    if model_type == "dpr":
        return "pooler", False
    pooling_cfg = path / "1_Pooling" / "config.json"
    if pooling_cfg.exists():
        cfg = json.loads(pooling_cfg.read_text())
        pooling = "mean" if cfg.get("pooling_mode_mean_tokens") else "cls"
        modules = path / "modules.json"
        normalize = modules.exists() and "Normalize" in modules.read_text()
        return pooling, normalize
    return "cls", False


def _model_class(config, default):
    """AutoModel maps every DPR checkpoint to DPRQuestionEncoder; a context tower must load as itself."""
    import transformers

    if config.model_type == "dpr" and config.architectures:
        return getattr(transformers, config.architectures[0])
    return default


class DenseEncoder(nn.Module):
    """One tower: texts -> (N, d) vectors. Pairs (title, text) are encoded as the tokenizer's sentence pair."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str, normalize: bool, max_length: int, name: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise LatentRagError(f"unknown pooling '{pooling}': choose one of {', '.join(POOLINGS)}")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.normalize, self.max_length, self.name = pooling, normalize, max_length, name
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, pooling: str | None = None, normalize: bool | None = None, max_length: int = 256
    ) -> DenseEncoder:
        """Load any Hugging Face encoder (hub name or folder; 'minilm' is the bundled all-MiniLM-L6-v2)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        resolved = resolve_encoder(name_or_path)
        path = Path(resolved)
        saved = path / _TOWER_FILE
        meta = json.loads(saved.read_text()) if saved.exists() else {}
        try:
            config = AutoConfig.from_pretrained(resolved)
            model = _model_class(config, AutoModel).from_pretrained(resolved)
            tokenizer = AutoTokenizer.from_pretrained(resolved)
        except OSError as e:
            raise LatentRagError(f"cannot load encoder '{name_or_path}': {e}") from e
        auto_pool, auto_norm = _detect_pooling(path, config.model_type)
        return cls(
            model,
            tokenizer,
            pooling or meta.get("pooling", auto_pool),
            meta.get("normalize", auto_norm) if normalize is None else normalize,
            meta.get("max_length", max_length),
            meta.get("name", name_or_path),
        )

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        meta = {"pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length, "name": self.name}
        (directory / _TOWER_FILE).write_text(json.dumps(meta, indent=2))

    @property
    def dim(self) -> int:
        config = self.model.config
        return getattr(config, "projection_dim", 0) or config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, Tensor]:
        batch = self.tokenizer(
            texts, pairs, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **extra: Tensor) -> Tensor:
        """(N, L) token ids -> (N, d) pooled (and optionally normalised) vectors, differentiable."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        if self.pooling == "pooler":
            vectors = out.pooler_output
        elif self.pooling == "cls":
            vectors = out.last_hidden_state[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            vectors = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(vectors, dim=-1) if self.normalize else vectors

    def embed(self, texts: list[str], pairs: list[str] | None = None) -> Tensor:
        """Encode one batch with gradients (the query tower during training)."""
        return self(**self.tokenize(texts, pairs))

    @torch.inference_mode()
    def encode(
        self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64, progress: bool = False
    ) -> Tensor:
        """Encode many texts without gradients, in length-sorted batches (less padding), original order kept."""
        if not texts:
            return torch.empty(0, self.dim)
        lengths = [len(t) + (len(pairs[i]) if pairs else 0) for i, t in enumerate(texts)]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        out = torch.empty(len(texts), self.dim)
        was_training = self.training
        self.eval()
        for start in tqdm(range(0, len(order), batch_size), desc="encoding", disable=not progress, unit="batch"):
            rows = order[start : start + batch_size]
            batch_pairs = [pairs[i] for i in rows] if pairs else None
            out[rows] = self.embed([texts[i] for i in rows], batch_pairs).float().cpu()
        self.train(was_training)
        return out

    def fingerprint(self) -> str:
        """sha256 of the weights: which document tower built an index (recomputed after training)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for key, value in sorted(self.model.state_dict().items()):
                if self.pooling != "pooler" and "pooler" in key:
                    continue  # unused, and re-initialised at random on every load when the checkpoint lacks it
                digest.update(key.encode())
                digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            digest.update(f"{self.pooling}/{self.normalize}".encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def identity(self) -> dict:
        """What an index manifest records about the tower that encoded it."""
        return {
            "name": self.name,
            "sha256": self.fingerprint(),
            "dim": self.dim,
            "pooling": self.pooling,
            "normalize": self.normalize,
        }


def freeze(encoder: DenseEncoder) -> DenseEncoder:
    """The document tower stays fixed during training (paper §2.4): updating it would stale the index."""
    encoder.requires_grad_(False)
    encoder.eval()
    return encoder
