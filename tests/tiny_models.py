"""Tiny random models and offline tokenizers for tests: built from configs in milliseconds, no hub access.

Every builder is deterministic: the same `seed` gives the same weights, and the global torch RNG is left
as it was (weights are drawn inside `torch.random.fork_rng`). Models come back in `eval()` mode with every
dropout set to 0, so train mode gives the same numbers too.

Raw Hugging Face pieces (each returns `(model, tokenizer)`):

    tiny_bart()                    BartForConditionalGeneration + BART-style byte-level BPE tokenizer
                                   (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last; labels are "<s> y </s>")
    tiny_bert()                    BertModel + WordPiece BertTokenizer
    tiny_dpr_question_encoder()    DPRQuestionEncoder + the same WordPiece tokenizer
    tiny_dpr_context_encoder()     DPRContextEncoder + the same WordPiece tokenizer
    tiny_llama(chat_template=...)  LlamaForCausalLM + byte-level BPE tokenizer (<unk>=0, <s>=1, </s>=2, <pad>=3)

Wrapped as latentrag objects:

    tiny_seq2seq_generator()       latentrag.generation.generators.Seq2SeqGenerator over tiny_bart()
    tiny_decoder_only_generator()  latentrag.generation.generators.DecoderOnlyGenerator over tiny_llama()
    tiny_dense_encoder(kind)       latentrag.retrieval.encoders.DenseEncoder over a tiny DPR tower or BERT
    tiny_passages()                a few `Passage`s (about the `CORPUS` sentences) to index and retrieve

    one_thread()                   context manager: torch and faiss on one thread while tiny models run.
                                   On a loaded 2-core machine, two OpenMP threads on these tiny tensors
                                   spin-wait each other and a test that takes 0.1 s takes 8 s.

Tokenizers are trained on `CORPUS` (plus the full byte alphabet for BPE, all printable ASCII for
WordPiece), so any text tokenises without unknown tokens; words of the corpus get whole-word tokens.
The default `init_std` is larger than the checkpoints' 0.02 on purpose: with tiny widths, 0.02 gives
nearly uniform next-token distributions, and tests that compare numbers would then pass on almost anything.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from latentrag.retrieval.corpus import Passage

__all__ = [
    "CORPUS",
    "QUESTIONS",
    "bart_tokenizer",
    "bert_tokenizer",
    "llama_tokenizer",
    "one_thread",
    "tiny_bart",
    "tiny_bert",
    "tiny_decoder_only_generator",
    "tiny_dense_encoder",
    "tiny_dpr_context_encoder",
    "tiny_dpr_question_encoder",
    "tiny_llama",
    "tiny_passages",
    "tiny_seq2seq_generator",
]

# (title, text): the knowledge the tiny passages hold; the tokenizers are trained on it and on the questions.
_FACTS = [
    ("Paris", "Paris is the capital of France and its largest city, on the river Seine."),
    ("Eiffel Tower", "The Eiffel Tower is a wrought-iron tower in Paris, built by Gustave Eiffel in 1889."),
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("William Shakespeare", "William Shakespeare was an English playwright and poet, born in Stratford."),
    ("Nile", "The Nile is a river in Africa that flows north through Egypt into the Mediterranean Sea."),
    ("Mount Everest", "Mount Everest is the highest mountain on Earth, in the Himalayas of Nepal and China."),
    ("Marie Curie", "Marie Curie was a physicist and chemist who won two Nobel Prizes, in 1903 and 1911."),
    ("Jupiter", "Jupiter is the largest planet of the Solar System, a gas giant with dozens of moons."),
    ("Moon", "The Moon is the only natural satellite of Earth; Neil Armstrong walked on it in 1969."),
    ("Beethoven", "Ludwig van Beethoven was a German composer who wrote nine symphonies."),
]
QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "Which river flows through Egypt?",
    "What is the highest mountain on Earth?",
    "Who walked on the Moon first?",
]
CORPUS: list[str] = [f"{title} / {text}" for title, text in _FACTS] + QUESTIONS
ANSWERS = ["Paris", "William Shakespeare", "the Nile", "Mount Everest", "Neil Armstrong"]  # of QUESTIONS, in order


def tiny_passages() -> list[Passage]:
    """The ten `CORPUS` facts as passages with ids "0".."9"."""
    return [Passage(id=str(i), title=title, text=text) for i, (title, text) in enumerate(_FACTS)]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch (and faiss) on one thread inside the block, restoring the previous counts after."""
    import faiss

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)


# ---- tokenizers ---------------------------------------------------------------------------------------


def _byte_level_bpe(corpus: Iterable[str], special_tokens: list[str], vocab_size: int):
    """Train a byte-level BPE (GPT-2/RoBERTa/BART style) in memory: -> (vocab dict, merges list of pairs).

    The special tokens take ids 0.. in the order given; the 256 byte symbols are always in the vocabulary.
    Training is deterministic (ties are broken by token id), so ids are stable from run to run.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    model = json.loads(tok.to_str())["model"]
    return dict(model["vocab"]), [tuple(pair) for pair in model["merges"]]


def bart_tokenizer(corpus: Iterable[str] = CORPUS, vocab_size: int = 400):
    """A BART tokenizer (transformers' BartTokenizer, byte-level BPE) with BART's special-token layout.

    <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=last; `tok(text)` and `tok(text_target=...)` give "<s> … </s>".
    """
    from transformers import BartTokenizer

    vocab, merges = _byte_level_bpe(corpus, ["<s>", "<pad>", "</s>", "<unk>"], vocab_size)
    vocab["<mask>"] = len(vocab)
    return BartTokenizer(vocab=vocab, merges=merges)


def bert_tokenizer(corpus: Iterable[str] = CORPUS):
    """A lower-casing WordPiece BertTokenizer: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then the corpus
    words, then every printable ASCII character alone and as a "##" continuation (so nothing is unknown)."""
    from transformers import BertTokenizer

    vocab: dict[str, int] = {}
    for token in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]:
        vocab[token] = len(vocab)
    words = pre_tokenizers.BertPreTokenizer()
    for line in corpus:
        for word, _ in words.pre_tokenize_str(line.lower()):
            vocab.setdefault(word, len(vocab))
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault("##" + ch, len(vocab))
    return BertTokenizer(vocab=vocab)


_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def llama_tokenizer(corpus: Iterable[str] = CORPUS, vocab_size: int = 400, chat_template: bool = False):
    """A Llama-style tokenizer (byte-level BPE): <unk>=0, <s>=1, </s>=2, <pad>=3; `tok(text)` prepends <s>.

    chat_template=True adds a minimal chat template (`apply_chat_template` works, as for instruct models);
    without it the tokenizer has none, as for base models.
    """
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _byte_level_bpe(corpus, ["<unk>", "<s>", "</s>", "<pad>"], vocab_size)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


# ---- models -------------------------------------------------------------------------------------------


def _build(model_cls, config, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def tiny_bart(seed: int = 0, tokenizer=None, init_std: float = 0.3, **config):
    """(BartForConditionalGeneration, tokenizer): 2+2 layers, d_model 32, vocab = the tokenizer's.

    Keyword arguments override BartConfig fields (e.g. d_model=64, max_position_embeddings=512).
    """
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = tokenizer or bart_tokenizer()
    values = dict(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=init_std,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,  # as facebook/bart-*: </s> starts the decoder
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    values.update(config)
    return _build(BartForConditionalGeneration, BartConfig(**values), seed), tokenizer


def _bert_config_values(tokenizer, init_std: float) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=init_std,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_bert(seed: int = 0, tokenizer=None, init_std: float = 0.2, **config):
    """(BertModel, WordPiece tokenizer): 2 layers, hidden 32. Keyword arguments override BertConfig fields."""
    from transformers import BertConfig, BertModel

    tokenizer = tokenizer or bert_tokenizer()
    values = _bert_config_values(tokenizer, init_std) | config
    return _build(BertModel, BertConfig(**values), seed), tokenizer


def tiny_dpr_question_encoder(seed: int = 0, tokenizer=None, init_std: float = 0.2, **config):
    """(DPRQuestionEncoder, WordPiece tokenizer): a BERT tower whose `pooler_output` is the [CLS] vector."""
    from transformers import DPRConfig, DPRQuestionEncoder

    tokenizer = tokenizer or bert_tokenizer()
    values = _bert_config_values(tokenizer, init_std) | config
    return _build(DPRQuestionEncoder, DPRConfig(**values), seed), tokenizer


def tiny_dpr_context_encoder(seed: int = 0, tokenizer=None, init_std: float = 0.2, **config):
    """(DPRContextEncoder, WordPiece tokenizer): the document tower, same shape as the question tower."""
    from transformers import DPRConfig, DPRContextEncoder

    tokenizer = tokenizer or bert_tokenizer()
    values = _bert_config_values(tokenizer, init_std) | config
    return _build(DPRContextEncoder, DPRConfig(**values), seed), tokenizer


def tiny_llama(seed: int = 0, tokenizer=None, chat_template: bool = False, init_std: float = 0.2, **config):
    """(LlamaForCausalLM, tokenizer): 2 layers, hidden 32, 4 heads / 2 KV heads (grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or llama_tokenizer(chat_template=chat_template)
    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attention_dropout=0.0,
        initializer_range=init_std,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    values.update(config)
    return _build(LlamaForCausalLM, LlamaConfig(**values), seed), tokenizer


# ---- latentrag wrappers -------------------------------------------------------------------------------


def tiny_seq2seq_generator(seed: int = 0, max_input_length: int = 256, **config):
    """latentrag's Seq2SeqGenerator over `tiny_bart(seed, **config)` (the model is `generator.model`)."""
    from latentrag.generation.generators import Seq2SeqGenerator

    model, tokenizer = tiny_bart(seed, **config)
    return Seq2SeqGenerator(model, tokenizer, "tiny-bart", max_input_length)


def tiny_decoder_only_generator(seed: int = 0, chat_template: bool = False, max_input_length: int = 512, **config):
    """latentrag's DecoderOnlyGenerator over `tiny_llama(seed, chat_template=..., **config)`."""
    from latentrag.generation.generators import DecoderOnlyGenerator

    model, tokenizer = tiny_llama(seed, chat_template=chat_template, **config)
    return DecoderOnlyGenerator(model, tokenizer, "tiny-llama", max_input_length)


_TOWERS = {
    "dpr-question": (tiny_dpr_question_encoder, "pooler"),
    "dpr-context": (tiny_dpr_context_encoder, "pooler"),
    "bert": (tiny_bert, "cls"),
}


def tiny_dense_encoder(kind: str = "dpr-question", seed: int = 0, pooling: str | None = None,
                       normalize: bool = False, max_length: int = 128, **config):
    """latentrag's DenseEncoder over a tiny tower: kind "dpr-question", "dpr-context" (pooler = [CLS]) or
    "bert" (CLS pooling by default; pass pooling="mean" for sentence-transformers style)."""
    from latentrag.retrieval.encoders import DenseEncoder

    build, default_pooling = _TOWERS[kind]
    model, tokenizer = build(seed, **config)
    return DenseEncoder(model, tokenizer, pooling or default_pooling, normalize, max_length, f"tiny-{kind}")


def save_tiny_parts(root, pairs: int = 40, cycle: int | None = None, generators=("bart", "llama")):
    """A training world in `root`: tiny towers (q, ctx), generators (bart; llama with a chat template), the index
    of `tiny_passages` (index) and train.jsonl of `pairs` questions cycling over the first `cycle` QUESTIONS
    (all by default; repeats differ by trailing spaces, so their ids and texts are distinct)."""
    from latentrag.retrieval.index import build_index

    makers = {"bart": lambda: tiny_bart(seed=2), "llama": lambda: tiny_llama(seed=3, chat_template=True)}
    tiny_dense_encoder("dpr-question", seed=0).save_pretrained(root / "q")
    context = tiny_dense_encoder("dpr-context", seed=1)
    context.save_pretrained(root / "ctx")
    for name in generators:
        model, tok = makers[name]()
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    build_index(tiny_passages(), context, root / "index", progress=False)
    cycle = cycle or len(QUESTIONS)
    with open(root / "train.jsonl", "w") as f:
        for i in range(pairs):
            j = i % cycle
            f.write(json.dumps({"id": f"q{i}", "question": QUESTIONS[j] + " " * (i // cycle),
                                "answers": [ANSWERS[j]]}) + "\n")
    return root


def steer_decoding(monkeypatch, generator, edit, on_step=None) -> None:
    """Make `generator` decode through `edit(logprobs) -> logprobs` at its first and every later step (ban </s>,
    force tokens); `on_step()` runs before each later step (to time or slow it)."""
    start, step = generator.start, generator.step

    def steered_step(state, tokens):
        if on_step is not None:
            on_step()
        new_state, logprobs = step(state, tokens)
        return new_state, edit(logprobs)

    monkeypatch.setattr(generator, "start", lambda *a, **kw: (lambda s, lp: (s, edit(lp)))(*start(*a, **kw)))
    monkeypatch.setattr(generator, "step", steered_step)


def tiny_train_settings(parts, out, **kw):
    """`TrainSettings` of a short run over a `save_tiny_parts` world (BART generator, LoRA r = 4); `kw` overrides."""
    from latentrag.training import TrainSettings

    values = dict(train=str(parts / "train.jsonl"), out=str(out), k=3, steps=4, batch_size=2, eval_every=2,
                  save_every=2, val_fraction=0.1, val_questions=4, max_new_tokens=4, index=str(parts / "index"),
                  query_encoder=str(parts / "q"), document_encoder=str(parts / "ctx"), generator=str(parts / "bart"),
                  lora_rank=4, lr=1e-2)
    values.update(kw)
    return TrainSettings(**values)


def forcing(target: list[int]):
    """A `steer_decoding` edit that makes the i-th decoding step choose target[i] (then the last one, repeated)."""
    position = [0]

    def force(logprobs):
        i = min(position[0], len(target) - 1)
        position[0] += 1
        logprobs[...] = float("-inf")
        logprobs[..., target[i]] = 0.0
        return logprobs

    return force
