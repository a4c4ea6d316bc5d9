"""The numeric defaults, each defined once: every signature, config field and CLI option that has one
reads it from here (the default model and corpus names live with the assets, in `latentrag.assets`)."""

MAX_NEW_TOKENS = 32  # answer tokens decoded at most (</s> included), for RAG and the closed-book baseline
PASSAGE_WORDS = 100  # words per passage: the paper's disjoint 100-word chunks of Wikipedia (DPR's split)
DEFAULT_K = 5  # passages retrieved per question and marginalised over
