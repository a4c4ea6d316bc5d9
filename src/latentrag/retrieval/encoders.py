"""The two towers of the bi-encoder: q(x) = BERT_q(x) and d(z) = BERT_d(z) (paper §2.2, DPR).

Any Hugging Face encoder works; a tower is the chain transformer → pooling (CLS, mean, max, last token,
or the model's own pooler for DPR checkpoints) → optional L2 normalisation, as in sentence-transformers.
A sentence-transformers folder is read as sentence-transformers reads it: `modules.json` names the
modules in order (Transformer, Pooling, Normalize), the Pooling module's `config.json` the pooling mode
(the `pooling_mode_*` flags of older versions, or `pooling_mode` of newer ones). A module or mode that this
chain cannot reproduce (Dense, weighted-mean pooling, several modes concatenated) is refused with a clear
error, never silently replaced by CLS pooling: vectors pooled another way would be quietly wrong.
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
from latentrag.tokenizing import FixedTokenizer

POOLINGS = ("cls", "mean", "max", "lasttoken", "pooler")
_TOWER_FILE = "latentrag_encoder.json"
# sentence-transformers' names of a pooling mode (flags of its older config files, and aliases) -> ours
_ST_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_ST_ALIASES = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max", "last_token": "lasttoken"}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LatentRagError(f"cannot read {path}: {e}") from e


def read_pooling_config(path: Path) -> str:
    """The one pooling mode a sentence-transformers Pooling `config.json` declares, as one of POOLINGS."""
    cfg = _read_json(path)
    mode = cfg.get("pooling_mode")
    if mode is not None:  # sentence-transformers ≥ 5: "mean", "cls", ... ("a+b" or a list: several concatenated)
        modes = [str(m) for m in mode] if isinstance(mode, list) else str(mode).split("+")
    else:  # older files: one boolean flag per mode
        modes = [_ST_FLAGS.get(key, key.removeprefix("pooling_mode_")) for key, on in cfg.items()
                 if key.startswith("pooling_mode_") and on is True]
    modes = [_ST_ALIASES.get(m, m) for m in modes]
    if len(modes) != 1:
        raise LatentRagError(
            f"{path} declares {'no pooling mode' if not modes else 'the modes ' + ' + '.join(modes) + ' concatenated'}: "
            "latentrag pools one way (cls, mean, max or lasttoken); save the model with one pooling mode")
    if modes[0] not in POOLINGS or modes[0] == "pooler":
        raise LatentRagError(f"{path}: pooling mode '{modes[0]}' is not supported: latentrag pools with cls, mean, "
                             "max or lasttoken (pass pooling= to DenseEncoder.from_pretrained to choose one)")
    return modes[0]


def read_sentence_transformers(path: Path) -> tuple[Path, str | None, bool]:
    """(folder of the transformer, pooling, normalise) a checkpoint declares through sentence-transformers'
    files; (path, None, False) when it has none. Modules other than Transformer, Pooling and Normalize are
    refused: latentrag's tower could not reproduce their vectors."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        legacy = path / "1_Pooling" / "config.json"  # a pooling config without modules.json
        return path, (read_pooling_config(legacy) if legacy.is_file() else None), False
    modules = _read_json(modules_file)
    if not isinstance(modules, list):
        raise LatentRagError(f"{modules_file} is not a list of modules")
    model_dir, pooling, normalize = path, None, False
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        folder = path / module.get("path", "")
        if kind == "Transformer":
            model_dir = folder
        elif kind == "Pooling":
            pooling = read_pooling_config(folder / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise LatentRagError(
                f"{modules_file}: module '{module.get('type')}' is not supported: latentrag's tower is "
                "Transformer → Pooling → Normalize (a model with other modules needs sentence-transformers itself)")
    if pooling is None:
        raise LatentRagError(f"{modules_file} declares no Pooling module: its output is not one vector per text")
    return model_dir, pooling, normalize


def _model_class(config, default):
    """AutoModel maps every DPR checkpoint to DPRQuestionEncoder; a context tower must load as itself."""
    import transformers

    if config.model_type == "dpr" and config.architectures:
        return getattr(transformers, config.architectures[0])
    return default


class DenseEncoder(nn.Module):
    """One tower: texts -> (N, d) vectors. Pairs (title, text) are encoded as the tokenizer's sentence pair."""

    source = None  # where the weights came from (`latentrag.saving.Source`), set when built by `saving.load_part`

    def __init__(self, model: nn.Module, tokenizer, pooling: str, normalize: bool, max_length: int, name: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise LatentRagError(f"unknown pooling '{pooling}': choose one of {', '.join(POOLINGS)}")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.normalize, self.max_length, self.name = pooling, normalize, max_length, name
        # a private copy called one way only: safe from many threads (see latentrag.tokenizing)
        self._encode_texts = FixedTokenizer(tokenizer, padding=True, truncation=True, max_length=max_length,
                                            return_tensors="pt")
        self._fingerprint: str | None = None

    def requires_grad_(self, requires_grad: bool = True) -> DenseEncoder:
        """As nn.Module's, but a pooler this tower's pooling never reads stays frozen: it would get no
        gradient, which DDP refuses (LoRA leaves it out likewise)."""
        super().requires_grad_(requires_grad)
        if requires_grad and self.pooling != "pooler":
            for name, p in self.model.named_parameters():
                if "pooler" in name:
                    p.requires_grad_(False)
        return self

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, pooling: str | None = None, normalize: bool | None = None, max_length: int = 256
    ) -> DenseEncoder:
        """Load any Hugging Face encoder (hub name or folder; 'minilm' is the bundled all-MiniLM-L6-v2).

        Pooling and normalisation, unless given: as latentrag saved them, else as the folder's
        sentence-transformers files declare (`read_sentence_transformers`), else DPR's pooler for DPR
        checkpoints and CLS for a plain encoder.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = Path(resolve_encoder(name_or_path))
        saved = path / _TOWER_FILE
        meta = json.loads(saved.read_text()) if saved.exists() else {}
        model_dir, st_pooling, st_normalize = read_sentence_transformers(path)
        try:
            config = AutoConfig.from_pretrained(model_dir)
            model = _model_class(config, AutoModel).from_pretrained(model_dir)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except OSError as e:
            raise LatentRagError(f"cannot load encoder '{name_or_path}': {e}") from e
        auto_pool = "pooler" if config.model_type == "dpr" else st_pooling or "cls"
        return cls(
            model,
            tokenizer,
            pooling or meta.get("pooling", auto_pool),
            meta.get("normalize", st_normalize) if normalize is None else normalize,
            meta.get("max_length", max_length),
            meta.get("name", name_or_path),
        )

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        meta = {"pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length, "name": self.name}
        (directory / _TOWER_FILE).write_text(json.dumps(meta, indent=2))

    def settings(self) -> dict:
        """What a saved model's description records of this tower besides its weights (`latentrag.saving`)."""
        return {"pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length, "name": self.name}

    @property
    def dim(self) -> int:
        config = self.model.config
        return getattr(config, "projection_dim", 0) or config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, Tensor]:
        batch = self._encode_texts(texts, pairs, max_length=self.max_length)
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **extra: Tensor) -> Tensor:
        """(N, L) token ids -> (N, d) pooled (and optionally normalised) vectors, differentiable."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        hidden = None if self.pooling == "pooler" else out.last_hidden_state  # (N, L, h); DPR outputs have none
        if self.pooling == "pooler":
            vectors = out.pooler_output
        elif self.pooling == "cls":
            vectors = hidden[:, 0]
        elif self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        elif self.pooling == "max":  # over the real tokens only
            vectors = hidden.masked_fill(attention_mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min).max(1).values
        else:  # lasttoken: the last real token, whichever side the padding is on
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (attention_mask.bool() * positions).argmax(1)
            vectors = hidden[torch.arange(len(hidden), device=hidden.device), last]
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
