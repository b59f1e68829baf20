"""Echoed prompts and invented years in LLM item descriptions, with and without the item task in the prompt.

Starts the local llama.cpp server (``grasp.llm.LocalServer``, SmolLM2-135M-Instruct by default), asks it to
describe the first ``--items`` items of a dataset twice with the same settings: once with the instruction
only in the system prompt (grasp before the item task) and once with the item task at the end of the user
message (grasp's default), and prints the echo rate and the invented-year rate of each as a markdown table
(``grasp.generation.quality``). Answers go through the shared cache, so a rerun, or the items a
``grasp generate --generator local`` run with the same settings already described, cost nothing.

    python benchmarks/llm_text_quality.py --dataset ml-100k --data-dir path/to/ml-100k --items 100 \\
        --max-tokens 160 --csv benchmarks/results/llm_text_quality.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import subprocess
import sys
from contextlib import closing, nullcontext
from pathlib import Path

from grasp.cache import SharedResponses, open_shared_cache
from grasp.data import preprocess
from grasp.data.sources import add_dataset_arguments, raw_from_args
from grasp.generation import (
    DEFAULT_SYSTEM_PROMPT,
    OpenAIGenerator,
    echo_rate,
    invented_year_rate,
    item_prompts,
    latest_year,
)
from grasp.llm import LocalServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataset_arguments(parser, required=True)
    parser.add_argument("--items", type=int, default=100, help="describe the first N items (default 100)")
    parser.add_argument("--model-path", type=Path, help="GGUF model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=160, help="longest answer (default 160)")
    parser.add_argument("--threads", type=int, default=1, help="server threads (default 1)")
    parser.add_argument("--csv", type=Path, help="append the rows to this CSV file")
    args = parser.parse_args(argv)

    dataset = preprocess(raw_from_args(args))
    latest = latest_year(dataset.item_attributes)
    plain = item_prompts(dataset)[1 : args.items + 1]
    tasked = item_prompts(dataset, task=True)[1 : args.items + 1]
    rows = []
    shared = open_shared_cache()
    cache = SharedResponses(shared) if shared is not None else None  # GRASP_CACHE=off: nothing kept
    with LocalServer(args.model_path, threads=args.threads) as server, closing(shared) if shared else nullcontext():
        for name, prompts in (("instruction in the system prompt only", plain),
                              ("item task at the end of the user message", tasked)):  # fmt: skip
            generator = OpenAIGenerator(server.model, base_url=server.base_url, concurrency=1, timeout=600,
                                        max_tokens=args.max_tokens, system_prompt=DEFAULT_SYSTEM_PROMPT,
                                        cache=cache)  # fmt: skip
            result = generator.generate(prompts, progress=True)
            texts = [t or "" for t in result.texts]
            rows.append({"prompt": name, "items": len(prompts), "echo_rate": echo_rate(plain, texts),
                         "invented_year_rate": invented_year_rate(texts, latest) if latest else float("nan"),
                         "failures": len(result.failures), "requests": result.stats["requests"]})  # fmt: skip
    print(f"\n{dataset.name}, first {args.items} items, {server.model}, max_tokens {args.max_tokens}, temperature 0")
    print(f"(invented year: names a year after {latest}, the newest in the data)\n")
    print("| prompt | items | echo rate | invented-year rate |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['prompt']} | {row['items']} | {100 * row['echo_rate']:.1f}% | "
              f"{100 * row['invented_year_rate']:.1f}% |")  # fmt: skip
    if args.csv is not None:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        new = not args.csv.exists()
        with args.csv.open("a", newline="") as file:
            writer = csv.writer(file)
            if new:
                writer.writerow(["date", "commit", "dataset", "model", "max_tokens", "prompt", "items", "echo_rate",
                                 "invented_year_rate", "latest_year", "failures"])  # fmt: skip
            for row in rows:
                writer.writerow([datetime.date.today().isoformat(), commit, dataset.name, server.model,
                                 args.max_tokens, row["prompt"], row["items"], f"{row['echo_rate']:.4f}",
                                 f"{row['invented_year_rate']:.4f}", latest, row["failures"]])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
