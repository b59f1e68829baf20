"""Embedding (docs/design.md section 1, stage 3): texts -> float32 matrices ``U`` (users x D) and ``I`` (items x D).

:func:`make_encoder` gives a local, offline sentence-transformers encoder (``"sentence-transformers"``,
all-MiniLM-L6-v2 by default) or an OpenAI-compatible embeddings endpoint (``"openai"``).
"""

from grasp.embedding.encoders import (
    ENCODERS,
    MAX_INPUTS_PER_REQUEST,
    EmbeddingError,
    OpenAIEmbeddingEncoder,
    SentenceTransformerEncoder,
    make_encoder,
)

__all__ = [
    "SentenceTransformerEncoder",
    "OpenAIEmbeddingEncoder",
    "EmbeddingError",
    "make_encoder",
    "ENCODERS",
    "MAX_INPUTS_PER_REQUEST",
]
