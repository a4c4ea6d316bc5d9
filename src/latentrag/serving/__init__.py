"""Serving RAG to programs and people: a service object over a `RagModel` (micro-batched, hot-swappable
index), FastAPI routes over it, and a page that streams answers with their evidence.

    from latentrag.serving import RagService, create_app
    service = RagService(model, indexes_root, "wiki-leads-minilm-flat")
    service.answer_batch(["Who wrote Hamlet?"], service.settings(AskRequest(question="...")))
"""

from latentrag.serving.service import RagService, ServiceError

__all__ = ["RagService", "ServiceError", "create_app"]


def create_app(service: RagService):
    """The FastAPI application over `service` (imported lazily: the library does not need FastAPI)."""
    from latentrag.serving.app import create_app as _create

    return _create(service)
