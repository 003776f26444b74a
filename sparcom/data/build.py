"""Assemble a HexaInst variant from public, human-written sources.

Dolly-15k gives classification, general QA, generation and summarization; GSM8K gives math;
MBPP gives code. Each source is read through ``datasets.load_dataset``: by hub name when online,
or from a local JSON/JSONL file or folder. Records are converted to the HexaInst schema, filtered
through the same quality rules as the shipped file, and sampled (seeded) into a balanced set.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sparcom.data import CATEGORIES, Record
from sparcom.data.validate import CATEGORY_RULES, code_problems


@dataclass(frozen=True)
class Source:
    hub_name: str
    hub_config: str | None
    split: str
    license: str
    convert: Callable[[dict], Iterator[tuple[str, Record]]]  # row -> (category, record without id)


DOLLY_CATEGORIES = {
    "classification": "classification",
    "open_qa": "general_qa",
    "general_qa": "general_qa",
    "brainstorming": "generation",
    "creative_writing": "generation",
    "summarization": "summarization",
}


def convert_dolly(row: dict) -> Iterator[tuple[str, Record]]:
    category = DOLLY_CATEGORIES.get(row.get("category", ""))
    if category is None:
        return
    # Dolly's classification answers are often sentences that classify several items at once;
    # a short answer is the label-like kind HexaInst's classification tasks have.
    if category == "classification" and len(row["response"].split()) > 10:
        return
    yield (
        category,
        {
            "instruction": row["instruction"].strip(),
            "input": row.get("context", "").strip(),
            "output": row["response"].strip(),
        },
    )


def convert_gsm8k(row: dict) -> Iterator[tuple[str, Record]]:
    # GSM8K marks calculator steps as "<<48/2=24>>24"; dropping the marks leaves "48/2 = 24"
    # style equations that the math rule checks, and "#### 72" becomes HexaInst's final line.
    body, _, final = row["answer"].rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    answer = final.strip().replace(",", "")
    yield (
        "math",
        {"instruction": row["question"].strip(), "input": "", "output": f"{body}\nFinal answer: {answer}"},
    )


def convert_mbpp(row: dict) -> Iterator[tuple[str, Record]]:
    code = row["code"].replace("\r\n", "\n").strip()
    setup = (row.get("test_setup_code") or "").strip()
    tests = "\n".join(row.get("test_list") or [])
    program = "\n\n".join(part for part in (setup, code, tests) if part)
    yield "code", {"instruction": row["text"].strip(), "input": "", "output": f"```python\n{program}\n```"}


SOURCES = {
    "dolly": Source("databricks/databricks-dolly-15k", None, "train", "CC BY-SA 3.0", convert_dolly),
    "gsm8k": Source("openai/gsm8k", "main", "train", "MIT", convert_gsm8k),
    "mbpp": Source("google-research-datasets/mbpp", "full", "train", "CC BY 4.0", convert_mbpp),
}
SOURCE_OF_CATEGORY = {
    "classification": "dolly",
    "general_qa": "dolly",
    "generation": "dolly",
    "summarization": "dolly",
    "math": "gsm8k",
    "code": "mbpp",
}


def load_rows(name: str, location: str | None = None) -> list[dict]:
    """Rows of a source: from a local file or folder when ``location`` exists, else from the hub."""
    import datasets

    source = SOURCES[name]
    if location and os.path.exists(location):
        path = Path(location)
        files = sorted(str(p) for p in path.glob("*.json*")) if path.is_dir() else [str(path)]
        if not files:
            raise FileNotFoundError(f"no .json/.jsonl files for source {name!r} in {location}")
        dataset = datasets.load_dataset("json", data_files=files, split="train")
    else:
        dataset = datasets.load_dataset(location or source.hub_name, source.hub_config, split=source.split)
    return list(dataset)


def passes_rules(category: str, record: Record) -> bool:
    if category == "code":
        return not code_problems(record)
    rule = CATEGORY_RULES.get(category)
    return not (rule and rule(record))


def build(locations: dict[str, str | None], per_category: int, seed: int = 0) -> list[Record]:
    """A balanced, seeded sample of ``per_category`` records for each of the six categories.

    ``locations`` maps a source name (dolly, gsm8k, mbpp) to a local path or hub name (None: the
    default hub name). Raises ``ValueError`` naming the category when a source has too few usable records.
    """
    rng = random.Random(seed)
    pools: dict[str, list[Record]] = {c: [] for c in CATEGORIES}
    for name in sorted(set(SOURCE_OF_CATEGORY.values())):
        source = SOURCES[name]
        for row_number, row in enumerate(load_rows(name, locations.get(name))):
            for category, record in source.convert(row):
                origin = f"{source.hub_name}:{source.split}:{row.get('task_id', row_number)}"
                pools[category].append({**record, "origin": origin, "license": source.license})
    chosen: list[Record] = []
    seen: set[str] = set()
    for category in CATEGORIES:
        pool = pools[category]
        rng.shuffle(pool)
        taken: list[Record] = []
        for record in pool:
            key = " ".join(record["instruction"].lower().split())
            if key in seen or not record["output"] or not passes_rules(category, record):
                continue
            seen.add(key)
            taken.append(record)
            if len(taken) == per_category:
                break
        if len(taken) < per_category:
            raise ValueError(
                f"category {category!r}: only {len(taken)} usable records in {SOURCE_OF_CATEGORY[category]} "
                f"(of {len(pool)}), need {per_category}; lower --per-category"
            )
        chosen += [
            {
                "id": f"{category}-{i:03d}",
                "category": category,
                **{k: r[k] for k in ("instruction", "input", "output", "origin", "license")},
            }
            for i, r in enumerate(taken, start=1)
        ]
    return chosen


def write_jsonl(records: list[Record], path: str | Path) -> None:
    """Write records atomically: a temporary file renamed over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
