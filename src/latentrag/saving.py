"""What a saved model folder holds, and the one function that builds each part from its description.

    my-model/
      rag_config.json          the RagConfig: mode, k, label smoothing, beams, retrieval scale, document tower
      parts.json               one description per part (below)
      query_encoder/           the query tower's full weights and tokenizer, or
      query_encoder_adapter/   LoRA adapters over the base the description names (…_adapter_2/, … when stacked)
      generator/  or  generator_adapter/ …     the same for the generator
      generator_question_tokenizer/            when the generator reads the question as another tokenizer
                                               decodes it (Hugging Face RAG checkpoints), and no weights are saved

A part's description (`PartDescription`) says everything needed to build it again, from any working directory:

* `base`: where its weights start when they are not saved here — a bundled asset ("minilm", "smollm2"), a
  Hugging Face hub name, or an absolute folder, optionally one component ("question_encoder", "generator") of a
  Hugging Face RAG checkpoint. A base is only ever one of these portable names (`Base.portable`); weights that
  no portable base describes (a part loaded from another saved model's weights, a relative path, a part built in
  memory) are saved in full instead;
* `weights`: the subfolder holding the full weights, when they are saved;
* `adapters`: LoRA adapter subfolders, folded into the weights in this order when loading;
* `settings`: the query tower's pooling, normalisation, token limit and name; the generator's input length;
* `input_format`: how the generator reads a (question, passage) pair — its kind, and for seq2seq the separators,
  the prefix and the question tokenizer (subfolder).

`load_part` is the only way a part is built from a name or a folder (`RagModel.from_components`,
`RagModel.from_pretrained`, Hugging Face RAG checkpoints); every part it returns records where it came from
(`Source`: the portable base and the adapters already folded in), which `save_part` reads to write the part as
adapters over that base, or in full. Whatever the saved form, a loaded part comes back with every parameter
requiring gradients: trainable as a freshly built part is (`RagModel.set_trainable` decides from there).

A folder saved before parts.json existed loads as before: `<part>/` holds full weights, `<part>_adapter/`
adapters over the base rag_config.json names (`legacy_descriptions`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from latentrag.assets import BUNDLED_MODELS
from latentrag.errors import LatentRagError

CONFIG_FILE = "rag_config.json"
PARTS_FILE = "parts.json"
FORMAT = 1
ROLES = ("query_encoder", "generator")  # the parts a saved model holds besides its config
ADAPTER_SUFFIX = "_adapter"  # <part>_adapter/, <part>_adapter_2/, …: LoRA adapters in the order they are folded in
QUESTION_TOKENIZER = "generator_question_tokenizer"
RAG_COMPONENTS = ("question_encoder", "generator")


# ---- where a part's weights come from --------------------------------------------------------------------
@dataclass(frozen=True)
class Base:
    """The weights a part starts from: a bundled asset, a hub name or a folder (optionally one component of a
    Hugging Face RAG checkpoint)."""

    name: str
    component: str | None = None

    @classmethod
    def named(cls, name: str | Path, component: str | None = None) -> Base:
        """A base for `name` as a user gave it: an existing folder becomes its absolute path (so it resolves
        from any working directory); asset and hub names stay as they are."""
        text = str(name)
        if text not in BUNDLED_MODELS:
            path = Path(text).expanduser()
            if path.exists():
                text = str(path.resolve())
        return cls(text, component)

    @classmethod
    def parse(cls, name: str) -> Base:
        """A base from a name earlier versions recorded: 'checkpoint#generator' is a RAG checkpoint's component."""
        stem, _, component = str(name).rpartition("#")
        if stem and component in RAG_COMPONENTS:
            return cls.named(stem, component)
        return cls.named(name)

    @property
    def label(self) -> str:
        return f"{self.name}#{self.component}" if self.component else self.name

    def is_path(self) -> bool:
        """Whether the name can only be a folder: not an asset, nor of a hub name's form (`name`, `owner/name`)."""
        if self.name in BUNDLED_MODELS:
            return False
        path = Path(self.name).expanduser()
        return (path.is_absolute() or path.exists() or self.name.startswith((".", "~")) or "\\" in self.name
                or self.name.count("/") > 1)

    def portable(self) -> bool:
        """Resolvable from any working directory: a bundled asset, a hub name, or an absolute folder that exists."""
        if not self.is_path():
            return True
        path = Path(self.name).expanduser()
        return path.is_absolute() and path.exists()

    def check(self, role: str, where: str) -> None:
        """Refuse, with our error, a base that names a folder this machine does not have."""
        if self.is_path() and not Path(self.name).expanduser().exists():
            raise LatentRagError(
                f"{where}: its {role.replace('_', ' ')} starts from the folder {self.name}, which does not exist "
                "here: put that model back at that path, or save the model again with its weights "
                "(a model whose base is missing cannot be rebuilt)"
            )

    def to_json(self) -> dict:
        return {"name": self.name, "component": self.component}

    @classmethod
    def from_json(cls, value: dict | None) -> Base | None:
        return None if value is None else cls(value["name"], value.get("component"))


@dataclass(frozen=True)
class Adapter:
    """One set of LoRA adapter files, kept in memory (a few MB) so that a later save can write them again."""

    files: tuple[tuple[str, bytes], ...]

    @classmethod
    def read(cls, folder: Path) -> Adapter:
        return cls(tuple((p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()))

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files:
            (folder / name).write_bytes(data)


@dataclass(frozen=True)
class Source:
    """Where a loaded part's weights came from: a portable base (None: no portable name describes them) and
    the adapters folded into them since, in order."""

    base: Base | None
    adapters: tuple[Adapter, ...] = ()


# ---- the description -----------------------------------------------------------------------------------
@dataclass
class PartDescription:
    """What parts.json says of one part (see the module docstring)."""

    base: Base | None = None
    weights: str | None = None
    adapters: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    input_format: dict | None = None

    def to_json(self) -> dict:
        return {"base": None if self.base is None else self.base.to_json(), "weights": self.weights,
                "adapters": list(self.adapters), "settings": self.settings, "input_format": self.input_format}

    @classmethod
    def from_json(cls, value: dict) -> PartDescription:
        known = {f.name for f in fields(cls)}
        value = {k: v for k, v in value.items() if k in known}
        return cls(**{**value, "base": Base.from_json(value.get("base"))})


def adapter_folder(role: str, i: int) -> str:
    return role + ADAPTER_SUFFIX + ("" if i == 0 else f"_{i + 1}")


def read_descriptions(directory: Path, config: dict) -> dict[str, PartDescription]:
    """The parts of the saved model in `directory`: parts.json, or (folders saved before it) the layout."""
    path = directory / PARTS_FILE
    if not path.is_file():
        return legacy_descriptions(directory, config)
    try:
        saved = json.loads(path.read_text())
        parts = {role: PartDescription.from_json(saved["parts"][role]) for role in ROLES}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LatentRagError(f"{path} is unreadable ({e}): save the model again") from e
    if saved.get("format", FORMAT) > FORMAT:
        raise LatentRagError(f"{path} has format {saved['format']}, newer than this latentrag reads ({FORMAT}): "
                             "upgrade latentrag")
    return parts


def legacy_descriptions(directory: Path, config: dict) -> dict[str, PartDescription]:
    """A folder without parts.json: `<part>/` holds the weights, else `<part>_adapter/` adapters over the base
    the config names (a pseudo-name 'checkpoint#generator' read as that RAG checkpoint's component)."""
    parts = {}
    for role in ROLES:
        settings = {"max_input_length": config["max_input_length"]} if role == "generator" and \
            "max_input_length" in config else {}
        if (directory / role).is_dir():
            parts[role] = PartDescription(weights=role, settings=settings)
        elif (directory / adapter_folder(role, 0)).is_dir():
            parts[role] = PartDescription(base=Base.parse(config[role]), adapters=[adapter_folder(role, 0)],
                                          settings=settings)
        else:
            raise LatentRagError(f"{directory} lacks its {role} (neither {role}/ nor {adapter_folder(role, 0)}/)")
    return parts


# ---- building a part -----------------------------------------------------------------------------------
def load_part(role: str, description: PartDescription, directory: Path | None = None, *,
              max_input_length: int | None = None, prompt: str | None = None, cache: dict | None = None):
    """The part (`DenseEncoder` for the query tower, `Generator`) a description says, its adapters folded in,
    every parameter requiring gradients. `directory`: the saved model the description's subfolders are in;
    `max_input_length` and `prompt` (its style) override the generator's; `cache` shares one load of a RAG
    checkpoint between parts."""
    from latentrag.adapters import load_lora, merge_lora

    if role not in ROLES:
        raise LatentRagError(f"unknown part '{role}': choose from {', '.join(ROLES)}")
    where = str(directory) if directory is not None else "the model"
    settings = dict(description.settings)
    if role == "generator" and max_input_length is not None:
        settings["max_input_length"] = max_input_length
    if description.weights is not None:
        if directory is None:
            raise LatentRagError(f"the {role} description names saved weights but no folder holds them")
        folder = directory / description.weights
        if not folder.is_dir():
            raise LatentRagError(f"{where} lacks {description.weights}/, the {role}'s saved weights")
        part = _from_name(role, str(folder), settings)
        base = None  # the weights of this folder: no portable name describes them
    elif description.base is not None:
        base = description.base
        base.check(role, where)
        part = _from_rag(role, base, settings, cache) if base.component else _from_name(role, base.name, settings)
    else:
        raise LatentRagError(f"{where}: the {role} names neither a base nor saved weights")
    adapters = []
    for name in description.adapters:
        if directory is None or not (directory / name).is_dir():
            raise LatentRagError(f"{where} lacks {name}/, adapters of its {role}")
        merge_lora(load_lora(part.model, directory / name))
        adapters.append(Adapter.read(directory / name))
    if description.input_format is not None:
        _apply_input_format(part, description.input_format, directory)
    if role == "generator" and prompt is not None:
        part.set_prompt(prompt)
    part.requires_grad_(True)  # trainable whatever the saved form (peft's injection froze the base layers)
    part.source = Source(base, tuple(adapters))
    return part


def _from_name(role: str, name: str, settings: dict):
    from latentrag.generation.generators import load_generator
    from latentrag.retrieval.encoders import DenseEncoder

    if role == "generator":
        return load_generator(name, settings.get("max_input_length", 512))
    encoder = DenseEncoder.from_pretrained(name, pooling=settings.get("pooling"), normalize=settings.get("normalize"))
    return _encoder_settings(encoder, settings)


def _encoder_settings(encoder, settings: dict):
    from latentrag.retrieval.encoders import DenseEncoder

    if all(settings.get(k, getattr(encoder, k)) == getattr(encoder, k) for k in ("max_length", "name")):
        return encoder
    return DenseEncoder(encoder.model, encoder.tokenizer, encoder.pooling, encoder.normalize,
                        settings.get("max_length", encoder.max_length), settings.get("name", encoder.name))


def _from_rag(role: str, base: Base, settings: dict, cache: dict | None):
    from latentrag import hf_rag

    cache = {} if cache is None else cache
    if base.name not in cache:
        cache[base.name] = hf_rag.open_checkpoint(base.name)
    checkpoint = cache[base.name]
    if base.component == "generator" and role == "generator":
        return checkpoint.generator(settings.get("max_input_length"))
    if base.component == "question_encoder" and role == "query_encoder":
        return _encoder_settings(checkpoint.question_encoder(settings.get("max_length", 256)), settings)
    raise LatentRagError(f"the {role} cannot start from the RAG checkpoint's {base.component}")


def _apply_input_format(part, input_format: dict, directory: Path | None) -> None:
    kind = input_format.get("kind", part.kind)
    if kind != part.kind:
        raise LatentRagError(f"the saved input format is for a {kind} generator, but the weights are {part.kind}")
    if kind != "seq2seq":
        part.set_prompt(input_format.get("prompt", "full"))  # folders saved before prompt styles: "full"
        return
    question_tokenizer = None
    if input_format.get("question_tokenizer"):
        from transformers import AutoTokenizer

        question_tokenizer = AutoTokenizer.from_pretrained(directory / input_format["question_tokenizer"])
    part.configure_input(input_format["title_sep"], input_format["doc_sep"], input_format.get("prefix"),
                         question_tokenizer)


# ---- saving a part -------------------------------------------------------------------------------------
def save_part(part, role: str, folder: Path) -> PartDescription:
    """Write `part` into the model folder `folder`: as adapters over its portable base when it trains through
    LoRA adapters and has one (the adapters it was loaded with, then the new ones), else its full weights
    (new adapters folded into a copy). Returns its description."""
    import copy

    from latentrag.adapters import has_lora, merge_lora, save_lora
    from latentrag.generation.generators import QUESTION_TOKENIZER_DIR

    source = getattr(part, "source", None) or Source(None)
    description = PartDescription(settings=part.settings())
    if has_lora(part.model) and source.base is not None and source.base.portable():
        description.base = source.base
        for i, adapter in enumerate(source.adapters):
            adapter.write(folder / adapter_folder(role, i))
            description.adapters.append(adapter_folder(role, i))
        new = adapter_folder(role, len(source.adapters))
        save_lora(part.model, folder / new)
        description.adapters.append(new)
    else:
        weights = part
        if has_lora(part.model):  # adapters over weights no portable name describes: fold them into a copy
            weights = copy.deepcopy(part)
            merge_lora(weights.model)
        weights.save_pretrained(folder / role)
        description.weights = role
    if role == "generator":
        description.input_format = part.input_format()
        question_tokenizer = getattr(part, "question_tokenizer", None)
        if question_tokenizer is not None:
            inside = f"{role}/{QUESTION_TOKENIZER_DIR}"
            if description.weights is None or not (folder / inside).is_dir():
                question_tokenizer.save_pretrained(folder / QUESTION_TOKENIZER)
                inside = QUESTION_TOKENIZER
            description.input_format["question_tokenizer"] = inside
    return description


# ---- the whole folder ----------------------------------------------------------------------------------
def save_folder(model, directory: str | Path) -> None:
    """Write `model` into `directory` (atomically): rag_config.json, parts.json and each part (`save_part`)."""
    from latentrag.atomic import atomic_dir

    with atomic_dir(directory) as tmp:
        parts = {role: save_part(part, role, tmp) for role, part in model.parts()}
        labels = {role: d.base.label if d.base is not None else role for role, d in parts.items()}
        config = replace(model.config, retrieval_scale=model.retriever.scale,
                         max_input_length=model.generator.max_input_length, **labels)
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2))
        (tmp / PARTS_FILE).write_text(json.dumps(
            {"format": FORMAT, "parts": {role: d.to_json() for role, d in parts.items()}}, indent=2))


def load_folder(directory: str | Path, index=None, **overrides):
    """A RagModel from a folder `save_folder` (or an earlier version) wrote; `overrides` (RagConfig fields) are
    applied while it is built (the generator reads `max_input_length` tokens from the start)."""
    from latentrag.model import RagConfig, RagModel, check_overrides

    directory = Path(directory).expanduser()
    path = directory / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LatentRagError(f"{path} is unreadable ({e})") from e
    check_overrides(overrides)
    known = {f.name for f in fields(RagConfig)}
    config = RagConfig(**{k: v for k, v in saved.items() if k in known})
    descriptions = read_descriptions(directory, saved)
    cache: dict = {}
    query_encoder = load_part("query_encoder", descriptions["query_encoder"], directory, cache=cache)
    generator = load_part("generator", descriptions["generator"], directory, cache=cache,
                          max_input_length=overrides.get("max_input_length"), prompt=overrides.get("prompt"))
    labels = {role: d.base.label if d.base is not None else str((directory / d.weights).resolve())
              for role, d in descriptions.items()}
    config = replace(config, **{**labels, "max_input_length": generator.max_input_length,
                                "prompt": generator.prompt_style, **overrides})
    return RagModel.assemble(config, query_encoder, generator, index)
