"""LoRA adapters (through `peft`) on a generator or a query tower: small trainable deltas on frozen weights.

A fine-tuned model ships as its base models' names plus these adapters (a few MB), the way peft users
know them: `adapter_config.json` + `adapter_model.safetensors`, loadable with `peft.PeftModel` too.
The adapters are injected into the Hugging Face model in place (`peft.inject_adapter_in_model`), so the
generator and tower objects keep their own interfaces; `merge_lora` folds them into the weights for
inference at the base model's speed.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from latentrag.errors import LatentRagError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Every linear layer but the output head (tied to the embeddings in SmolLM2) and an encoder's pooler
# (unused by mean/CLS pooling: its adapter would get no gradient, which DDP refuses).
_EXCLUDE = r".*pooler.*"


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0) -> nn.Module:
    """Inject rank-`rank` LoRA adapters into every linear layer of `model`; only they stay trainable.

    alpha defaults to 2·rank (scale alpha/rank = 2). B starts at zero, so the model is unchanged until trained.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise LatentRagError(f"LoRA rank must be at least 1, got {rank}")
    exclude = _EXCLUDE if any(re.fullmatch(_EXCLUDE, name) for name, _ in model.named_modules()) else None
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules="all-linear", exclude_modules=exclude)
    return inject_adapter_in_model(config, model)


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def save_lora(model: nn.Module, directory: str | Path) -> None:
    """Write the adapters of `model` in peft's format (config + safetensors weights)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"]
    config.save_pretrained(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, directory / ADAPTER_WEIGHTS)


def load_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the adapters saved in `directory` into `model` (its base weights as they were trained on)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise LatentRagError(f"{directory} holds no LoRA adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    model = inject_adapter_in_model(LoraConfig.from_pretrained(directory), model)
    result = set_peft_model_state_dict(model, load_file(directory / ADAPTER_WEIGHTS))
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise LatentRagError(f"{directory}: adapter weights that fit no layer of the model ({missing[:3]})")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and drop it: same outputs, base-model speed, no peft layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
