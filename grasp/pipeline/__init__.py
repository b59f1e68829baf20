"""The offline half of GRASP in one run directory: prepare, generate, embed, retrieve (docs/design.md section 1)."""

from grasp.pipeline.manifest import Manifest, stage_key
from grasp.pipeline.stages import STAGES, StageError, embed, generate, load_texts, prepare, retrieve
from grasp.pipeline.tables import TABLE_FILES, Tables, check_embeddings

__all__ = [
    "Manifest",
    "stage_key",
    "STAGES",
    "StageError",
    "prepare",
    "generate",
    "embed",
    "retrieve",
    "load_texts",
    "Tables",
    "TABLE_FILES",
    "check_embeddings",
]
