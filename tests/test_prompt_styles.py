"""A decoder-only reader's prompt styles: "full" (chat template, default system prompt, instruction) and
"compact" (no instruction, the shortest system turn the template allows) — written, saved, loaded, trained."""

import json

import pytest
import torch
from tiny_models import (
    ANSWERS,
    QUESTIONS,
    save_tiny_parts,
    tiny_decoder_only_generator,
    tiny_seq2seq_generator,
)

from latentrag.errors import LatentRagError
from latentrag.model import RagModel
from latentrag.retrieval.corpus import Passage
from latentrag.training import train
from latentrag.training.trainer import build_model

# like SmolLM2's: a default system prompt when the conversation has none
_DEFAULT_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|system|>\nYou are a helpful AI "
    "assistant named Tiny, trained by nobody</s>\n{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# a template that refuses a system turn (as Gemma's)
_NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PASSAGE = Passage(id="p1", title="Paris", text="Paris is the capital of France.")


def _generator(template: str | None, style: str = "full"):
    generator = tiny_decoder_only_generator(seed=3, chat_template=template is not None)
    if template is not None:
        generator.tokenizer.chat_template = template
    generator.set_prompt(style)
    return generator


def test_compact_drops_the_instruction_and_the_default_system_prompt():
    full = _generator(_DEFAULT_SYSTEM_TEMPLATE).format_prompt("What is the capital of France?", PASSAGE)
    compact = _generator(_DEFAULT_SYSTEM_TEMPLATE, "compact").format_prompt("What is the capital of France?", PASSAGE)
    assert "named Tiny" in full and "Answer the question" in full
    assert "named Tiny" not in compact and "Answer the question" not in compact
    assert compact.startswith("<|system|>\n</s>\n<|user|>\nTitle: Paris\nPassage: Paris is the capital")
    assert compact.endswith("Question: What is the capital of France?</s>\n<|assistant|>\n")


def test_compact_keeps_the_shorter_rendering_and_templates_without_a_system_role():
    for template in (_NO_SYSTEM_TEMPLATE, None):
        compact = _generator(template, "compact")
        text = compact.format_prompt("Who?", PASSAGE)
        assert "Answer the question" not in text and "<|system|>" not in text
        assert text.startswith("<|user|>\nTitle: Paris" if template else "Title: Paris")
    plain = _generator(None, "compact")
    assert plain.format_closed_book("Who?") == "Question: Who?\nAnswer:"
    assert plain.concat_text("Who?", [PASSAGE, PASSAGE]).count("Title: Paris") == 2


def test_an_unknown_style_or_a_seq2seq_compact_prompt_is_refused():
    with pytest.raises(LatentRagError, match="prompt 'short'.*full, compact"):
        _generator(None).set_prompt("short")
    with pytest.raises(LatentRagError, match="seq2seq generator writes: choose from full"):
        tiny_seq2seq_generator().set_prompt("compact")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return save_tiny_parts(tmp_path_factory.mktemp("prompt-world"), pairs=12, generators=("llama",))


def _components(world) -> dict:
    return dict(query_encoder=str(world / "q"), document_encoder=str(world / "ctx"), generator=str(world / "llama"))


def test_the_style_is_saved_and_loads_back_and_a_load_can_override_it(world, tmp_path):
    model = RagModel.from_components(index=world / "index", **_components(world), k=3, prompt="compact")
    assert model.generator.prompt_style == "compact" and model.config.prompt == "compact"
    expected = model.generator.format_prompt(QUESTIONS[0], PASSAGE)
    torch.manual_seed(0)
    loss = model.loss(QUESTIONS[:2], ANSWERS[:2]).item()
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "parts.json").read_text())["parts"]["generator"]["input_format"] == {
        "kind": "decoder-only", "prompt": "compact"}
    loaded = RagModel.from_pretrained(tmp_path / "m", index=world / "index")
    assert loaded.generator.format_prompt(QUESTIONS[0], PASSAGE) == expected and loaded.config.prompt == "compact"
    assert loaded.loss(QUESTIONS[:2], ANSWERS[:2]).item() == pytest.approx(loss, abs=1e-5)
    assert RagModel.from_pretrained(tmp_path / "m", prompt="full").generator.prompt_style == "full"


def test_a_folder_saved_before_prompt_styles_reads_the_full_prompt(world, tmp_path):
    RagModel.from_components(**_components(world), k=3).save_pretrained(tmp_path / "old")
    parts = json.loads((tmp_path / "old" / "parts.json").read_text())
    assert parts["parts"]["generator"]["input_format"] == {"kind": "decoder-only"}  # what earlier versions wrote
    config = json.loads((tmp_path / "old" / "rag_config.json").read_text())
    config.pop("prompt")
    (tmp_path / "old" / "rag_config.json").write_text(json.dumps(config))
    loaded = RagModel.from_pretrained(tmp_path / "old")
    assert loaded.generator.prompt_style == "full" and loaded.config.prompt == "full"


def test_train_prompt_compact_trains_and_saves_the_compact_reader(world, tmp_path):
    from tiny_models import tiny_train_settings

    settings = tiny_train_settings(world, tmp_path / "run", generator=str(world / "llama"), steps=2, save_every=2,
                                   eval_every=2, prompt="compact")
    assert build_model(settings, str(world / "index"), torch.device("cpu")).generator.prompt_style == "compact"
    loaded = RagModel.from_pretrained(train(settings, progress=False))
    assert loaded.generator.prompt_style == "compact"
    text = loaded.generator.format_prompt(QUESTIONS[0], PASSAGE)
    assert loaded.generator.instruction not in text


def test_the_default_generators_compact_prompt_drops_its_system_prompt_and_instruction():
    from transformers import AutoTokenizer

    from latentrag.assets import smollm2_dir
    from latentrag.generation.generators import DecoderOnlyGenerator

    generator = object.__new__(DecoderOnlyGenerator)  # the prompt needs only the tokenizer: no weights loaded
    generator.tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    count = {}
    for style in ("full", "compact"):
        generator.prompt_style = style
        text = generator.format_prompt("Who wrote Hamlet?", PASSAGE)
        count[style] = len(generator.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert ("SmolLM" in text) == (style == "full") and (generator.instruction in text) == (style == "full")
    assert count["full"] - count["compact"] >= 25  # default system prompt and instruction: ~30 of ~50 tokens
