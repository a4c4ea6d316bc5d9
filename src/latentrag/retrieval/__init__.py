"""Retrieval: passages and corpora, the two towers, the dense index (a searcher), the retriever p_η(z|x)."""
