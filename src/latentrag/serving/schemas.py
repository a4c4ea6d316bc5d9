"""Request and response bodies of the HTTP API (pydantic): the bounds here are the server's input contract.

Strict types: a number where text is expected, "5" where a number is, or an unknown field is a 422, not a
guess. Questions are stripped, then must hold 1–2,000 characters, at least one of them visible (a question
of only zero-width or other format characters is refused).
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

MAX_QUESTION = 2000
MAX_K = 50
MAX_BEAMS = 16
MAX_NEW_TOKENS = 256

INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}  # controls, format (zero-width), unassigned, spaces


def _visible(question: str) -> str:
    if not any(unicodedata.category(ch) not in INVISIBLE for ch in question):
        raise ValueError("the question has no visible character (only spaces, zero-width or control characters)")
    return question


Question = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUESTION),
                     AfterValidator(_visible)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AskRequest(_Strict):
    question: Question
    mode: Literal["token", "sequence", "concat", "fid"] | None = Field(
        None, description="RAG-Token, RAG-Sequence, concat (all k passages in one input) or fid (Fusion-in-Decoder, "
                          "seq2seq generators); default: the model's")
    decoding: Literal["greedy", "beam", "thorough", "fast"] | None = Field(
        None, description="token, concat, fid: greedy | beam; sequence: thorough | fast")
    k: int | None = Field(None, ge=1, le=MAX_K, description="passages marginalised over (default: model's)")
    num_beams: int | None = Field(None, ge=1, le=MAX_BEAMS)
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stream: bool = Field(False, description="server-sent events, one per token (RAG-Token greedy only)")


class RetrieveRequest(_Strict):
    question: Question
    k: int | None = Field(None, ge=1, le=MAX_K)


class SwapRequest(_Strict):
    name: str = Field(..., min_length=1, max_length=200, description="an index folder name under the root")


class PassageOut(BaseModel):
    id: str
    title: str
    text: str
    probability: float = Field(..., description="p(z|x), the retriever's prior over the top-k")


class IndexRef(BaseModel):
    name: str
    manifest_sha256: str


class Timings(BaseModel):
    queue_ms: float
    retrieve_ms: float
    generate_ms: float = 0.0
    batch_size: int


class AskResponse(BaseModel):
    question: str
    answer: str
    mode: str
    decoding: str
    log_prob: float = Field(..., description="log p(y|x)")
    tokens: list[str]
    passages: list[PassageOut]
    posterior: list = Field(..., description="RAG-Token: p(z|x,y_≤i) per token (T×k); RAG-Sequence: p(z|x,y) (k); "
                                             "concat, fid: [] (all passages read at once, nothing to infer)")
    evidence: list[float] = Field(default_factory=list,
                                  description="p(z|x,y) over the k passages for the whole answer: its most probable "
                                  "passage is the answer's evidence (RAG-Token, RAG-Sequence; [] for concat, fid)")
    index: IndexRef
    timings: Timings


class RetrieveResponse(BaseModel):
    question: str
    passages: list[PassageOut]
    index: IndexRef
    timings: Timings


class IndexInfo(BaseModel):
    name: str
    active: bool
    manifest_sha256: str | None
    manifest: dict | None
    error: str | None = None


class IndexList(BaseModel):
    root: str
    active: str
    indexes: list[IndexInfo]


class ErrorBody(BaseModel):
    error: str
