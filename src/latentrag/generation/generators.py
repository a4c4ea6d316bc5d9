"""The generator p_θ(y_i | x, z, y_<i) behind one small interface, two kinds.

* `Seq2SeqGenerator` — BART/T5 (the paper's generator). The encoder reads "title / text // question"
  (the format of the paper's released code); the decoder is teacher-forced on the answer.
* `DecoderOnlyGenerator` — a causal LM. The prompt holds the passage and the question (through the
  tokenizer's chat template when it has one); the loss covers the answer tokens only.

Each kind also formats the two inputs that read all k passages at once: concatenation (`prepare_concat`:
one row per question holding the question and its k passages in retrieval order, cut to the input budget
from the end of the lowest-ranked passage) and, seq2seq only, Fusion-in-Decoder (`prepare_fused`: RAG's
B·k rows, each encoded on its own, their encoder states concatenated per question for one decoder).

Every method works on all B·k (question, passage) rows at once: one batched forward, never a loop
over documents. Shapes: N = B·k rows (row b·k + j is question b with its j-th passage), T answer
positions, V vocabulary.

Each kind also formats the closed-book ("parametric only") baseline's input, the same prompt without
the passage, so the two prompts cannot drift apart. Nothing here changes shared state per call: the
tokenizer is called through private fixed-settings copies (`latentrag.tokenizing`), so one generator
serves many threads.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from latentrag.assets import resolve_generator
from latentrag.errors import LatentRagError, LatentRagWarning
from latentrag.generation import shared_context
from latentrag.retrieval.corpus import Passage
from latentrag.tokenizing import FixedTokenizer

INPUT_FORMAT_FILE = "latentrag_input_format.json"  # a seq2seq generator's separators/prefix, when not the defaults
QUESTION_TOKENIZER_DIR = "question_tokenizer"


@dataclass
class GeneratorBatch:
    """Tokenised generator inputs for B questions × k passages, and optionally the target answers."""

    input_ids: Tensor  # (N, L)
    attention_mask: Tensor  # (N, L)
    k: int
    targets: Tensor | None = None  # (B, T) answer token ids (padding masked)
    target_mask: Tensor | None = None  # (B, T)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0] // self.k


@dataclass
class DecodeState:
    """Incremental decoding state for N rows: model cache and whatever the kind needs to extend it."""

    cache: Any
    attention_mask: Tensor
    extra: dict[str, Any] = field(default_factory=dict)


def _clean_title(title: str) -> str:
    """Strip a leading and a trailing double quote (psgs_w100 quotes some titles), as HF's RagRetriever does."""
    return title.removeprefix('"').removesuffix('"')


class Generator(nn.Module):
    """The interface: format, teacher-forced log-probs, and cached incremental steps for decoding."""

    kind: str
    source = None  # where the weights came from (`latentrag.saving.Source`), set when built by `saving.load_part`
    prompt_styles: tuple[str, ...] = ("full",)  # how a row can be written; the first is the default
    prompt_style = "full"

    def __init__(self, model: nn.Module, tokenizer, name: str, max_input_length: int = 512):
        super().__init__()
        self.model, self.tokenizer, self.name, self.max_input_length = model, tokenizer, name, max_input_length
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.shares_contexts = self._share_contexts()
        self._count_tokens = FixedTokenizer(tokenizer, add_special_tokens=self.adds_special_tokens)
        self._plain_tokens = FixedTokenizer(tokenizer, add_special_tokens=False)  # a passage's text alone
        self._tokenizers()

    def _tokenizers(self) -> None:
        """Make the fixed-settings tokenizer copies this kind calls (see `latentrag.tokenizing`)."""

    def set_prompt(self, style: str) -> None:
        """Write every row in `style` (one of `prompt_styles`; a decoder-only model's "compact" drops what a
        fine-tuned reader does not need — see `DecoderOnlyGenerator`)."""
        if style not in self.prompt_styles:
            raise LatentRagError(f"prompt '{style}' is not one a {self.kind} generator writes: choose from "
                                 f"{', '.join(self.prompt_styles)}")
        self.prompt_style = style

    def __setstate__(self, state: dict) -> None:
        """Unpickled in another process, the shared-context attention the model names is registered again."""
        super().__setstate__(state)
        if self.shares_contexts:
            shared_context.register()

    def _share_contexts(self) -> bool:
        """Switch the model to shared-context attention (`shared_context`) if its architecture allows."""
        return False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    # ---- the input budget: max_input_length tokens per (question, passage) row ----------------------
    adds_special_tokens = True  # whether `prepare` tokenizes with the tokenizer's special tokens
    truncates = "right"  # which end `prepare` cuts when a row is longer than max_input_length

    def input_text(self, question: str, passage: Passage) -> str:
        """The text the generator reads for one (question, passage) row, before tokenization."""
        raise NotImplementedError

    def _token_counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self._count_tokens(texts)["input_ids"]]

    def check_prompt_budget(self, questions: list[str]) -> None:
        """Refuse a question that alone fills the input budget of a generator that cuts from the left
        (decoder-only: the passage precedes the question): every passage would be cut away, so p(z|x,y)
        would equal p(z|x) and the answer would not read the evidence. A generator that cuts from the right
        (seq2seq, "passage // question", as Hugging Face's RAG) keeps the passage and loses the question's
        end; `warn_truncation` says so."""
        if self.truncates != "left":
            return
        empty = Passage("", "", "")
        for i, n in enumerate(self._token_counts([self.input_text(q, empty) for q in questions])):
            if n >= self.max_input_length:
                raise LatentRagError(
                    f"question {i} takes {n} tokens with the prompt around it, but the generator reads at most "
                    f"{self.max_input_length} (max_input_length) including the passage: shorten the question"
                )

    def warn_truncation(self, questions: list[str], passages: list[list[Passage]]) -> int:
        """Warn (LatentRagWarning) when (question, passage) rows exceed max_input_length and `prepare` will
        cut them; returns how many rows are cut. Decoder-only prompts lose their start (instruction, title,
        the passage's beginning); seq2seq inputs lose their end (the question's end)."""
        texts = [self.input_text(q, p) for q, ps in zip(questions, passages, strict=True) for p in ps]
        over = [n - self.max_input_length for n in self._token_counts(texts) if n > self.max_input_length]
        if over:
            cut = "the start of the prompt and passage" if self.truncates == "left" else "the end of the question"
            warnings.warn(
                f"{len(over)} of {len(texts)} generator inputs exceed max_input_length={self.max_input_length} "
                f"tokens and lose up to {max(over)} tokens ({cut}); the answer reads less of the evidence: "
                "use shorter questions or passages, or a larger max_input_length",
                LatentRagWarning,
                stacklevel=3,
            )
        return len(over)

    # ---- all k passages in one input (mode "concat") ------------------------------------------------
    def concat_text(self, question: str, passages: list[Passage]) -> str:
        """The one input that holds the question and its passages in retrieval order; with one passage it is
        exactly `input_text` (so concatenation at k = 1 reads what RAG reads)."""
        raise NotImplementedError

    def fit_concat(self, question: str, passages: list[Passage]) -> tuple[str, int]:
        """`concat_text` within max_input_length, and how many tokens it was over (0: nothing cut). What is
        over is cut from the end of the lowest-ranked passage first, then the next one up: the prompt, the
        titles and the question are kept, and so is the best-ranked evidence."""
        text = self.concat_text(question, passages)
        over = self._token_counts([text])[0] - self.max_input_length
        excess, kept = over, list(passages)
        for _ in range(4):  # the joined text re-tokenises a token or two differently: check again
            if over <= 0 or not any(p.text for p in kept):
                break
            for j in reversed(range(len(kept))):
                if over <= 0:
                    break
                ids = self._plain_tokens(kept[j].text)["input_ids"]
                keep = max(0, len(ids) - over)
                over -= len(ids) - keep
                cut = self._plain_tokens.tokenizer.decode(ids[:keep], skip_special_tokens=True,
                                                          clean_up_tokenization_spaces=False)
                kept[j] = replace(kept[j], text=cut.strip())
            text = self.concat_text(question, kept)
            over = self._token_counts([text])[0] - self.max_input_length
        return text, max(0, excess)  # anything still over is cut by the tokenizer (`truncates`)

    def prepare_concat(self, questions: list[str], passages: list[list[Passage]],
                       answers: list[str] | None = None) -> GeneratorBatch:
        """Concatenation's inputs: one row per question (k = 1 in the batch's layout) holding its passages in
        retrieval order, cut to max_input_length by `fit_concat`, with a LatentRagWarning when it cuts."""
        fitted = [self.fit_concat(q, ps) for q, ps in zip(questions, passages, strict=True)]
        over = [n for _, n in fitted if n > 0]
        if over:
            warnings.warn(
                f"{len(over)} of {len(fitted)} concatenated generator inputs exceed max_input_length="
                f"{self.max_input_length} tokens and lose up to {max(over)} tokens (the end of the lowest-ranked "
                "passages); the answer reads less of the evidence: use fewer or shorter passages, or a larger "
                "max_input_length",
                LatentRagWarning,
                stacklevel=3,
            )
        return self._with_answers(self._batch([text for text, _ in fitted], 1), answers)

    def prepare_fused(self, questions: list[str], passages: list[list[Passage]],
                      answers: list[str] | None = None) -> GeneratorBatch:
        """Fusion-in-Decoder's inputs (seq2seq generators only)."""
        raise LatentRagError(f"Fusion-in-Decoder needs an encoder-decoder generator; {self.name} is {self.kind}")

    def save_pretrained(self, directory) -> None:
        self.model.save_pretrained(directory)  # the attention implementation is not saved: plain HF loads it
        self.tokenizer.save_pretrained(directory)

    def settings(self) -> dict:
        """What a saved model's description records of this generator besides its weights (`latentrag.saving`)."""
        return {"max_input_length": self.max_input_length}

    def input_format(self) -> dict:
        """How this generator reads a (question, passage) pair, as a saved model's description records it."""
        return {"kind": self.kind} if self.prompt_style == "full" else {"kind": self.kind, "prompt": self.prompt_style}

    def prepare(self, questions: list[str], passages: list[list[Passage]], answers: list[str] | None = None):
        raise NotImplementedError

    def format_closed_book(self, question: str) -> str:
        """The closed-book baseline's input text: this kind's prompt with no passage."""
        raise NotImplementedError

    def prepare_closed_book(self, questions: list[str], answers: list[str] | None = None) -> GeneratorBatch:
        """Generator inputs for the closed-book baseline: one "passage" row per question (k = 1), with the
        answers as targets when given (closed-book training)."""
        return self._with_answers(self._batch([self.format_closed_book(q) for q in questions], 1), answers)

    def _batch(self, texts: list[str], k: int) -> GeneratorBatch:
        raise NotImplementedError

    def _with_answers(self, batch: GeneratorBatch, answers: list[str] | None) -> GeneratorBatch:
        """`batch` with the answers' token ids as its targets (and their mask); unchanged if answers is None."""
        raise NotImplementedError

    def vocab_logprobs(self, batch: GeneratorBatch) -> Tensor:
        """Teacher-forced log p_θ(· | x, z, y_<i) over the vocabulary: (B, k, T, V)."""
        raise NotImplementedError

    def start(self, batch: GeneratorBatch, prefix: list[int] | tuple[int, ...] = ()) -> tuple[DecodeState, Tensor]:
        """Read the inputs once and feed `prefix` (forced answer tokens); return the state and the log-probs
        of the next answer token (N, V)."""
        raise NotImplementedError

    def step(self, state: DecodeState, tokens: Tensor) -> tuple[DecodeState, Tensor]:
        """Feed one token per row (N,) and return the next token's log-probs (N, V); or feed T tokens per row
        (N, T) at once (teacher forcing from a cached prefix) and return the log-probs after each (N, T, V)."""
        raise NotImplementedError

    def select(self, state: DecodeState, rows: Tensor, same_context: bool = False) -> DecodeState:
        """A new state holding rows (N',) of `state` (keep/reorder/duplicate, for beam search); `state` itself
        is left untouched. same_context=True promises that new row i reads the same (question, passage) as
        old row i (beams reordered within a group), so per-context parts (encoder outputs, cross-attention
        keys/values) can be shared instead of copied even without shared-context attention."""
        raise NotImplementedError

    def fork(self, state: DecodeState) -> DecodeState:
        """An independent copy of `state` that later steps can extend without changing `state` (no data copied)."""
        return DecodeState(_fork_cache(state.cache), state.attention_mask, dict(state.extra))

    @property
    def answer_prefix(self) -> list[int]:
        """Tokens every answer starts with in this generator's target format (BART's <s>), which decoding
        forces rather than scores: y is the answer after them. Empty for decoder-only models and T5."""
        return []

    def decode_tokens(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _fork_cache(cache):
    """A cache object of its own over the same tensors: layers rebind (torch.cat) rather than write in place."""
    from transformers.cache_utils import Cache, EncoderDecoderCache

    if isinstance(cache, EncoderDecoderCache):
        return EncoderDecoderCache(_fork_cache(cache.self_attention_cache), cache.cross_attention_cache)
    if isinstance(cache, Cache):
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in cache.layers]
        return new
    return cache


def _select_cache(cache, rows: Tensor, keep_cross: bool = False):
    """A new cache with rows (N',) of `cache`; the original is not modified. keep_cross shares the
    cross-attention part (valid when every new row reads the same encoder context as the old row)."""
    from transformers.cache_utils import Cache, EncoderDecoderCache

    if cache is None:
        return None
    if isinstance(cache, EncoderDecoderCache):
        cross = cache.cross_attention_cache if keep_cross else _select_cache(cache.cross_attention_cache, rows)
        return EncoderDecoderCache(_select_cache(cache.self_attention_cache, rows), cross)
    if isinstance(cache, Cache):
        new = _fork_cache(cache)
        for layer in new.layers:
            layer.reorder_cache(rows)  # rebinds keys/values to index_select copies
        return new
    return tuple(tuple(t.index_select(0, rows) for t in layer) for layer in cache)


class Seq2SeqGenerator(Generator):
    """BART/T5 via AutoModelForSeq2SeqLM: encoder input "title / text // question", as the paper's code.

    Decoding keeps one copy of each (question, passage) context's encoder outputs and cross-attention
    keys/values however many beams read it (`shared_context`), where the architecture allows; a row's
    context is `state.extra["context"]` (None: row i reads context i).
    """

    kind = "seq2seq"
    title_sep, doc_sep = " / ", " // "
    prefix: str | None = None  # None: the model config's `prefix`, as HF's RAG
    # Set (e.g. for Hugging Face RAG checkpoints): questions reach the generator as this tokenizer's
    # decode(encode(question)) -- HF's RagRetriever feeds the generator the question encoder's decoded tokens
    # (lower-cased by DPR's uncased BERT), so checkpoints trained there expect that text.
    question_tokenizer = None

    def _share_contexts(self) -> bool:
        return shared_context.enable_cross(self.model)

    def configure_input(self, title_sep: str = " / ", doc_sep: str = " // ", prefix: str | None = None,
                        question_tokenizer=None) -> None:
        """The encoder input "prefix + title + title_sep + text + doc_sep + question" for this model."""
        self.title_sep, self.doc_sep, self.prefix, self.question_tokenizer = title_sep, doc_sep, prefix, question_tokenizer
        # a private fixed-settings copy: safe from many threads (see latentrag.tokenizing)
        self._encode_question = None if question_tokenizer is None else FixedTokenizer(question_tokenizer,
                                                                                        truncation=True)

    def _tokenizers(self) -> None:
        self._encode_inputs = FixedTokenizer(self.tokenizer, padding=True, truncation=True,
                                             max_length=self.max_input_length, return_tensors="pt")
        self._encode_targets = FixedTokenizer(self.tokenizer, padding=True, return_tensors="pt")

    def _prefix(self) -> str:
        if self.prefix is not None:
            return self.prefix
        return getattr(self.model.config, "prefix", None) or ""  # T5's task prefix (and HF RAG's `prefix`)

    def input_text(self, question: str, passage: Passage) -> str:
        return self.format_input(self.generator_question(question), passage)

    @property
    def truncates(self) -> str:
        return self._encode_inputs.tokenizer.truncation_side  # the side of the copy `prepare` calls

    def format_input(self, question: str, passage: Passage) -> str:
        text = self._prefix() + _clean_title(passage.title) + self.title_sep + passage.text + self.doc_sep + question
        return text.replace("  ", " ")

    def format_closed_book(self, question: str) -> str:
        return self._prefix() + self.generator_question(question)

    def concat_text(self, question: str, passages: list[Passage]) -> str:
        """"prefix + title_1 / text_1 // ... // title_k / text_k // question": RAG's input with k passages."""
        blocks = self.doc_sep.join(_clean_title(p.title) + self.title_sep + p.text for p in passages)
        return (self._prefix() + blocks + self.doc_sep + self.generator_question(question)).replace("  ", " ")

    def prepare_fused(self, questions, passages, answers=None) -> GeneratorBatch:
        """Fusion-in-Decoder's inputs: RAG's B·k (question, passage) rows, each within max_input_length and
        encoded on its own, marked so that `vocab_logprobs` and `start` concatenate each question's k encoder
        states (padding masked) into one context for one decoder."""
        batch = self.prepare(questions, passages, answers)
        batch.extra["fused"] = True
        return batch

    def encode(self, batch: GeneratorBatch):
        """Encoder outputs and their attention mask: one row per (question, passage), or, for a fused batch,
        one per question, its k rows' states side by side ((B, k·L, H), mask (B, k·L))."""
        encoder_outputs = self.model.get_encoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        if not batch.extra.get("fused"):
            return encoder_outputs, batch.attention_mask
        rows, length = batch.batch_size, batch.k * batch.input_ids.shape[1]
        hidden = encoder_outputs.last_hidden_state
        return (type(encoder_outputs)(last_hidden_state=hidden.reshape(rows, length, hidden.shape[-1])),
                batch.attention_mask.reshape(rows, length))

    def generator_question(self, question: str) -> str:
        """The question as the generator reads it: as given, or (HF RAG checkpoints) decode(encode(question))."""
        if self.question_tokenizer is None:
            return question
        ids = self._encode_question(question)["input_ids"]
        return self._encode_question.tokenizer.decode(ids, skip_special_tokens=True)

    def input_format(self) -> dict:
        """The separators and the prefix this generator reads (the question tokenizer, when set, is saved beside)."""
        return {"kind": self.kind, "title_sep": self.title_sep, "doc_sep": self.doc_sep, "prefix": self._prefix(),
                "question_tokenizer": None}

    def save_pretrained(self, directory) -> None:
        super().save_pretrained(directory)
        if (self.title_sep, self.doc_sep, self.prefix, self.question_tokenizer) != (" / ", " // ", None, None):
            settings = {"title_sep": self.title_sep, "doc_sep": self.doc_sep, "prefix": self.prefix,
                        "question_tokenizer": self.question_tokenizer is not None}
            if self.question_tokenizer is not None:
                self.question_tokenizer.save_pretrained(Path(directory) / QUESTION_TOKENIZER_DIR)
            (Path(directory) / INPUT_FORMAT_FILE).write_text(json.dumps(settings, indent=2))

    def _batch(self, texts: list[str], k: int) -> GeneratorBatch:
        enc = self._encode_inputs(texts, max_length=self.max_input_length)
        return GeneratorBatch(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device), k)

    def prepare(self, questions, passages, answers=None) -> GeneratorBatch:
        questions = [self.generator_question(q) for q in questions]
        texts = [self.format_input(q, p) for q, ps in zip(questions, passages, strict=True) for p in ps]
        return self._with_answers(self._batch(texts, len(passages[0])), answers)

    def _with_answers(self, batch: GeneratorBatch, answers: list[str] | None) -> GeneratorBatch:
        if answers is not None:
            tgt = self._encode_targets(text_target=list(answers))
            batch.targets, batch.target_mask = tgt["input_ids"].to(self.device), tgt["attention_mask"].to(self.device)
        return batch

    def _decoder_inputs(self, targets: Tensor) -> Tensor:
        start = self.model.config.decoder_start_token_id
        shifted = targets.new_full(targets.shape, self.pad_token_id)
        shifted[:, 1:] = targets[:, :-1]
        shifted[:, 0] = start
        return shifted

    def vocab_logprobs(self, batch: GeneratorBatch) -> Tensor:
        """(B, k, T, V); a fused batch (Fusion-in-Decoder) has one decoder per question: (B, 1, T, V)."""
        fused = batch.extra.get("fused", False)
        k = 1 if fused else batch.k
        decoder_input_ids = self._decoder_inputs(batch.targets).repeat_interleave(k, dim=0)
        decoder_mask = batch.target_mask.repeat_interleave(k, dim=0)
        decoder_mask[:, 0] = 1
        if fused:
            encoder_outputs, attention_mask = self.encode(batch)
            inputs = {"encoder_outputs": encoder_outputs, "attention_mask": attention_mask}
        else:
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        logits = self.model(
            **inputs,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_mask,
            use_cache=False,
        ).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return logprobs.view(batch.batch_size, k, *logprobs.shape[1:])

    def start(self, batch: GeneratorBatch, prefix: list[int] | tuple[int, ...] = ()) -> tuple[DecodeState, Tensor]:
        encoder_outputs, attention_mask = self.encode(batch)  # fused: one row per question
        state = DecodeState(None, attention_mask, {"encoder_outputs": encoder_outputs, "context": None})
        first = torch.tensor([self.model.config.decoder_start_token_id, *prefix], device=self.device)
        state, logprobs = self.step(state, first.expand(attention_mask.shape[0], -1))  # one forward for all
        return state, logprobs[:, -1]

    @property
    def answer_prefix(self) -> list[int]:
        if not hasattr(self, "_answer_prefix"):
            bos = self.tokenizer.bos_token_id
            ids = self._encode_targets(text_target=["a"])["input_ids"][0].tolist()
            self._answer_prefix = [bos] if bos is not None and ids and ids[0] == bos else []
        return self._answer_prefix

    def step(self, state: DecodeState, tokens: Tensor) -> tuple[DecodeState, Tensor]:
        context = state.extra.get("context")
        out = self.model(
            encoder_outputs=state.extra["encoder_outputs"],
            attention_mask=state.attention_mask,
            decoder_input_ids=tokens.view(tokens.shape[0], -1),
            past_key_values=state.cache,
            use_cache=True,
            **({} if context is None else {"context_grid": shared_context.ContextGrid.of(context, len(state.attention_mask))}),
        )
        state.cache = out.past_key_values
        logits = out.logits[:, -1] if tokens.dim() == 1 else out.logits
        return state, torch.log_softmax(logits.float(), dim=-1)

    def select(self, state: DecodeState, rows: Tensor, same_context: bool = False) -> DecodeState:
        if self.shares_contexts:  # rows point at the contexts they read; nothing per context is copied
            context = state.extra.get("context")
            context = rows if context is None else context.index_select(0, rows)
            return DecodeState(_select_cache(state.cache, rows, keep_cross=True), state.attention_mask,
                               {**state.extra, "context": context})
        if same_context:
            return DecodeState(_select_cache(state.cache, rows, keep_cross=True), state.attention_mask,
                               dict(state.extra))
        enc = state.extra["encoder_outputs"]
        selected = type(enc)(last_hidden_state=enc.last_hidden_state.index_select(0, rows))
        return DecodeState(
            _select_cache(state.cache, rows), state.attention_mask.index_select(0, rows),
            {**state.extra, "encoder_outputs": selected},
        )


class DecoderOnlyGenerator(Generator):
    """A causal LM: prompt = passage + question (chat template if the tokenizer has one), loss on the answer.

    Rows are laid out as [left-padded prompt | right-padded answer], so every prompt ends at the same
    column and the answer's log-probs sit in one aligned block for all N rows.

    Two prompt styles: "full" (default) is the chat template as the tokenizer writes it — with its default
    system prompt where it has one — and an instruction, which an untrained instruct model needs; "compact" is
    the shortest rendering the template allows (an empty system turn when that is shorter than the default
    one) and no instruction: a reader fine-tuned on it pays about a fifth fewer tokens per passage row (SmolLM2:
    176 → 143, benchmarks/results/precision.md), at every step of training and decoding.
    """

    kind = "decoder-only"
    prompt_styles = ("full", "compact")
    instruction = "Answer the question with a short phrase, using the passage if it helps."
    closed_book_instruction = "Answer the question with a short phrase."
    concat_instruction = "Answer the question with a short phrase, using the passages if they help."

    def _share_contexts(self) -> bool:
        return shared_context.enable_prompt(self.model)

    def _tokenizers(self) -> None:
        # prompts padded and truncated on the left: every prompt ends at the same column, and a prompt too
        # long loses its start (the passage), never the question at its end
        self._encode_prompts = FixedTokenizer(self.tokenizer, padding_side="left", truncation_side="left",
                                              padding=True, truncation=True, max_length=self.max_input_length,
                                              add_special_tokens=False, return_tensors="pt")
        self._encode_answers = FixedTokenizer(self.tokenizer, add_special_tokens=False)

    def _prompt(self, instruction: str, body: str) -> str:
        content = body if self.prompt_style == "compact" else f"{instruction}\n\n{body}"
        if not getattr(self.tokenizer, "chat_template", None):
            return f"{content}\nAnswer:"
        user = [{"role": "user", "content": content}]
        full = self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        if self.prompt_style != "compact":
            return full
        from jinja2 import TemplateError

        try:  # a template that writes a default system prompt when given none writes an empty one when given ""
            empty = self.tokenizer.apply_chat_template([{"role": "system", "content": ""}, *user], tokenize=False,
                                                       add_generation_prompt=True)
        except TemplateError:  # a template without a system role
            return full
        return min(full, empty, key=len)

    adds_special_tokens = False
    truncates = "left"  # keep the question and the answer's position

    def input_text(self, question: str, passage: Passage) -> str:
        return self.format_prompt(question, passage)

    def format_prompt(self, question: str, passage: Passage) -> str:
        body = f"Title: {_clean_title(passage.title)}\nPassage: {passage.text}\nQuestion: {question}"
        return self._prompt(self.instruction, body)

    def concat_text(self, question: str, passages: list[Passage]) -> str:
        """The RAG prompt with k Title/Passage blocks, best-ranked first, before the question."""
        if len(passages) == 1:
            return self.format_prompt(question, passages[0])
        blocks = "\n\n".join(f"Title: {_clean_title(p.title)}\nPassage: {p.text}" for p in passages)
        return self._prompt(self.concat_instruction, f"{blocks}\n\nQuestion: {question}")

    def format_closed_book(self, question: str) -> str:
        """The RAG prompt without its Title/Passage lines, and an instruction that mentions no passage."""
        return self._prompt(self.closed_book_instruction, f"Question: {question}")

    def _answer_ids(self, answers: list[str]) -> tuple[Tensor, Tensor]:
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        texts = [a.strip() if chat else " " + a.strip() for a in answers]
        rows = [ids + [self.eos_token_id] for ids in self._encode_answers(texts)["input_ids"]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _batch(self, prompts: list[str], k: int) -> GeneratorBatch:
        enc = self._encode_prompts(prompts, max_length=self.max_input_length)
        return GeneratorBatch(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device), k)

    def prepare(self, questions, passages, answers=None) -> GeneratorBatch:
        prompts = [self.format_prompt(q, p) for q, ps in zip(questions, passages, strict=True) for p in ps]
        return self._with_answers(self._batch(prompts, len(passages[0])), answers)

    def _with_answers(self, batch: GeneratorBatch, answers: list[str] | None) -> GeneratorBatch:
        if answers is not None:
            batch.targets, batch.target_mask = self._answer_ids(list(answers))
        return batch

    @staticmethod
    def _positions(mask: Tensor) -> Tensor:
        return (mask.cumsum(-1) - 1).clamp(min=0)

    def vocab_logprobs(self, batch: GeneratorBatch) -> Tensor:
        k, width = batch.k, batch.input_ids.shape[1]
        answers = batch.targets.repeat_interleave(k, dim=0)
        answer_mask = batch.target_mask.repeat_interleave(k, dim=0)
        input_ids = torch.cat([batch.input_ids, answers[:, :-1]], dim=1)
        mask = torch.cat([batch.attention_mask, answer_mask[:, :-1]], dim=1)
        # position width-1+t predicts answer token t: only those T positions need the vocabulary projection
        answer_logits = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=self._positions(mask),
            logits_to_keep=input_ids.shape[1] - (width - 1),
        ).logits
        logprobs = torch.log_softmax(answer_logits.float(), dim=-1)
        return logprobs.view(batch.batch_size, k, *logprobs.shape[1:])

    def start(self, batch: GeneratorBatch, prefix: list[int] | tuple[int, ...] = ()) -> tuple[DecodeState, Tensor]:
        if prefix:
            state, _ = self.start(batch)
            state, logprobs = self.step(state, torch.tensor(list(prefix), device=self.device).expand(
                len(batch.input_ids), -1))
            return state, logprobs[:, -1]
        mask = batch.attention_mask
        out = self.model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=self._positions(mask),
            use_cache=True,
            logits_to_keep=1,
        )
        if self.shares_contexts:  # the prompt cache stays one copy per context; rows grow answer caches
            state = DecodeState(None, mask.new_ones(len(mask), 0), {
                "prompt": out.past_key_values, "prompt_mask": mask.bool(), "next_position": mask.sum(-1),
                "context": torch.arange(len(mask), device=mask.device)})
        else:
            state = DecodeState(out.past_key_values, mask, {"next_position": mask.sum(-1)})
        return state, torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def step(self, state: DecodeState, tokens: Tensor) -> tuple[DecodeState, Tensor]:
        from transformers import DynamicCache

        new = tokens.view(tokens.shape[0], -1)  # (N, t)
        width, extra, cache, shared = new.shape[1], state.extra, state.cache, {}
        if self.shares_contexts:  # the prompt is read from its one per-context copy; the cache holds answers
            cache = cache if cache is not None else DynamicCache()
            shared = dict(context_grid=shared_context.ContextGrid.of(extra["context"], len(extra["prompt_mask"])),
                          prompt_cache=extra["prompt"], prompt_mask=extra["prompt_mask"])
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(new.shape)], dim=1)
        position = extra["next_position"]
        out = self.model(
            input_ids=new,
            attention_mask=mask,
            position_ids=position.view(-1, 1) + torch.arange(width, device=position.device),
            past_key_values=cache,
            use_cache=True,
            **shared,
        )
        state = DecodeState(out.past_key_values, mask, {**extra, "next_position": position + width})
        logits = out.logits[:, -1] if tokens.dim() == 1 else out.logits
        return state, torch.log_softmax(logits.float(), dim=-1)

    def select(self, state: DecodeState, rows: Tensor, same_context: bool = False) -> DecodeState:
        extra = {**state.extra, "next_position": state.extra["next_position"].index_select(0, rows)}
        if self.shares_contexts:
            extra["context"] = state.extra["context"].index_select(0, rows)
        return DecodeState(_select_cache(state.cache, rows), state.attention_mask.index_select(0, rows), extra)


def _load_input_format(generator: Seq2SeqGenerator, directory: Path) -> None:
    path = directory / INPUT_FORMAT_FILE
    if not path.exists():
        return
    from transformers import AutoTokenizer

    settings = json.loads(path.read_text())
    question_tokenizer = (AutoTokenizer.from_pretrained(directory / QUESTION_TOKENIZER_DIR)
                          if settings.get("question_tokenizer") else None)
    generator.configure_input(settings["title_sep"], settings["doc_sep"], settings.get("prefix"), question_tokenizer)


def load_generator(name_or_path: str, max_input_length: int = 512) -> Generator:
    """Load a generator, choosing its kind from the config: encoder-decoder -> seq2seq, else decoder-only.

    'smollm2' is the bundled SmolLM2-135M-Instruct (converted once from GGUF and cached).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    resolved = resolve_generator(name_or_path)
    try:
        config = AutoConfig.from_pretrained(resolved)
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        if config.is_encoder_decoder:
            generator = Seq2SeqGenerator(
                AutoModelForSeq2SeqLM.from_pretrained(resolved), tokenizer, name_or_path, max_input_length
            )
            _load_input_format(generator, Path(resolved))
            return generator
        return DecoderOnlyGenerator(
            AutoModelForCausalLM.from_pretrained(resolved), tokenizer, name_or_path, max_input_length
        )
    except OSError as e:
        raise LatentRagError(f"cannot load generator '{name_or_path}': {e}") from e
