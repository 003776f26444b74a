"""Quality rules for HexaInst-schema files; each problem is reported with its line number."""

from __future__ import annotations

import ast
import json
import math
import re
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sparcom.data import CATEGORIES, DataError, Record, read_jsonl

NEAR_DUPLICATE_JACCARD = 0.8
CODE_TIMEOUT_S = 10.0
_EXPRESSION_CHARS = set("0123456789.+-*/() ")
_FINAL_ANSWER = re.compile(r"^Final answer:\s*(-?\d+(?:\.\d+)?)\s*$")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


def normalise(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: the form duplicates are judged in."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def word_bigrams(text: str) -> frozenset[tuple[str, str]]:
    words = normalise(text).split()
    return (
        frozenset(zip(words, words[1:], strict=False))
        if len(words) > 1
        else frozenset((w, "") for w in words)
    )


def duplicate_problems(numbered: list[tuple[int, Record]]) -> list[tuple[int, str]]:
    """Exact duplicates of the normalised instruction, and near-duplicates of instruction + input.

    Near-duplicate: Jaccard similarity of word-bigram sets >= NEAR_DUPLICATE_JACCARD. Candidate
    pairs come from an inverted index on bigrams, so only pairs sharing a bigram are compared.
    """
    problems: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    exact: set[int] = set()  # lines already reported as exact duplicates: one report per line
    for number, record in numbered:
        key = normalise(record["instruction"])
        if key in first_line:
            problems.append((number, f"duplicate instruction (same as line {first_line[key]})"))
            exact.add(number)
        else:
            first_line[key] = number
    shingles = [word_bigrams(r["instruction"] + " " + r["input"]) for _, r in numbered]
    index: dict[tuple[str, str], list[int]] = defaultdict(list)
    for position, grams in enumerate(shingles):
        shared = Counter(other for gram in grams for other in index[gram])
        for other, common in shared.items():
            union = len(grams) + len(shingles[other]) - common
            if numbered[position][0] not in exact and union and common / union >= NEAR_DUPLICATE_JACCARD:
                problems.append(
                    (
                        numbered[position][0],
                        f"near-duplicate of line {numbered[other][0]} (Jaccard {common / union:.2f})",
                    )
                )
        for gram in grams:
            index[gram].append(position)
    return problems


# ----------------------------------------------------------------------------------------- math


def _evaluate(expression: str) -> float | None:
    """Value of a pure arithmetic expression, or None when it is not one."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, RecursionError):
        return None

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            operand = value(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            return left / right
        raise ValueError("not arithmetic")

    try:
        return value(tree.body)
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


def _balanced(expression: str) -> str:
    """Trim stray leading ')' or '(' that the scan picked up from surrounding prose."""
    expression = expression.strip()
    while expression and (expression.count("(") != expression.count(")")):
        if expression.count("(") > expression.count(")") and expression[0] == "(":
            expression = expression[1:].strip()
        elif expression.count(")") > expression.count("(") and expression[-1] == ")":
            expression = expression[:-1].strip()
        else:
            break
    return expression


def equations(text: str) -> list[tuple[str, float, float, int]]:
    """Every ``EXPR = VALUE`` in ``text``: (expression, its value, the stated value, stated decimals).

    EXPR is the longest run of digits, '.', operators, parentheses and spaces before an '=' that
    contains an operator; VALUE the number right after it.
    """
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-")
    found = []
    for match in re.finditer(r"=", text):
        start = match.start()
        while start > 0 and text[start - 1] in _EXPRESSION_CHARS:
            start -= 1
        run = re.split(r"\.\s", text[start : match.start()])[-1]  # not the end of the sentence before
        # Leading operators belong to prose or a variable ("x*3 = 6"); a '-' on a digit is a sign.
        run = run.lstrip("+*/ ")
        expression = _balanced(run if re.match(r"-[\d(]", run) else run.lstrip("+-*/ "))
        after = re.match(r"\s*(-?\d+(?:\.\d+)?)(?!\d)", text[match.end() :])
        if not after or not any(op in expression[1:] for op in "+-*/"):
            continue
        rest = text[match.end() + after.end() :].lstrip(" ")
        if rest[:1] in ("+", "*", "/") or (rest[:1] == "-" and rest[1:2] in " (0123456789"):
            continue  # "a = b + c": the right side is an expression, not a stated value
        computed = _evaluate(expression)
        stated = after.group(1)
        decimals = len(stated.split(".")[1]) if "." in stated else 0
        if computed is not None:
            found.append((expression, computed, float(stated), decimals))
    return found


def _agrees(computed: float, stated: float, decimals: int) -> bool:
    if decimals:
        return abs(computed - stated) <= 0.5 * 10**-decimals + 1e-9
    return math.isclose(computed, stated, rel_tol=1e-9, abs_tol=1e-9)


def math_problems(record: Record) -> list[str]:
    lines = [line for line in record["output"].strip().splitlines() if line.strip()]
    final = _FINAL_ANSWER.match(lines[-1].strip()) if lines else None
    if not final:
        return ["math output must end with a line 'Final answer: N'"]
    found = equations("\n".join(lines[:-1]))
    if not found:
        return ["math output has no 'EXPR = VALUE' equation to check the answer against"]
    problems = [
        f"equation {expr} = {stated:g} is wrong (it is {computed:g})"
        for expr, computed, stated, decimals in found
        if not _agrees(computed, stated, decimals)
    ]
    answer = final.group(1)
    answer_decimals = len(answer.split(".")[1]) if "." in answer else 0
    last_value = found[-1][2]
    if not _agrees(last_value, float(answer), max(answer_decimals, found[-1][3])):
        problems.append(f"final answer {answer} differs from the last equation's value {last_value:g}")
    return problems


# ------------------------------------------------------------------------------ classification


def offered_labels(instruction: str) -> list[str]:
    """Labels an instruction offers: the double-quoted strings in it."""
    return [label.strip() for label in re.findall(r'"([^"]+)"', instruction)]


def classification_problems(record: Record) -> list[str]:
    # Quoted labels are HexaInst's authoring convention; public data (which carries a licence)
    # states its classes in free prose, so only the project's own records are held to it.
    if "license" in record:
        return []
    labels = offered_labels(record["instruction"])
    if len(labels) < 2:
        return ['classification instruction must offer at least two labels in double quotes ("a" or "b")']
    answer = record["output"].strip().rstrip(".").strip().casefold()
    if answer not in {label.casefold() for label in labels}:
        return [f"output {record['output']!r} is not one of the offered labels {labels}"]
    return []


def summarization_problems(record: Record) -> list[str]:
    source = record["input"] if record["input"].strip() else record["instruction"]
    if len(record["output"].split()) >= len(source.split()):
        return [
            f"summary has {len(record['output'].split())} words, not fewer than the {len(source.split())} it summarises"
        ]
    return []


# ------------------------------------------------------------------------------------- code


def code_of(output: str) -> str:
    """The Python in a code answer: its ```python fenced blocks joined, or the whole answer."""
    blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)```", output, flags=re.DOTALL)
    return "\n\n".join(blocks) if blocks else output


# Runs in a fresh interpreter (-I: no site, no user paths): exec the code as a module, then its doctests.
_RUNNER = """
import doctest, sys, types
module = types.ModuleType("hexainst_record")
source = sys.stdin.read()
exec(compile(source, "<record>", "exec"), module.__dict__)
failed, _ = doctest.testmod(module, verbose=False)
sys.exit(1 if failed else 0)
"""


def code_problems(record: Record) -> list[str]:
    source = code_of(record["output"])
    try:
        ast.parse(source)
    except SyntaxError as err:
        return [f"code output is not valid Python: {err.msg} (code line {err.lineno})"]
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", _RUNNER],
            input=source,
            capture_output=True,
            text=True,
            timeout=CODE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return [f"code output did not finish within {CODE_TIMEOUT_S:g}s"]
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["doctest failed"])[
            -1
        ]
        return [f"code output fails when run: {detail[:200]}"]
    return []


CATEGORY_RULES = {
    "math": math_problems,
    "classification": classification_problems,
    "summarization": summarization_problems,
}


# ----------------------------------------------------------------------------------- report


def validate_file(path: str | Path, run_code: bool = True) -> tuple[dict, list[DataError]]:
    """Check a HexaInst-schema file against every rule. Returns (summary, problems)."""
    path = str(path)
    numbered, errors = read_jsonl(path)
    for number, record in numbered:
        if record["category"] not in CATEGORIES:
            errors.append(
                DataError(
                    path,
                    number,
                    f"unknown category {record['category']!r}; expected one of {list(CATEGORIES)}",
                )
            )
        for name in ("instruction", "output"):
            if not record[name].strip():
                errors.append(DataError(path, number, f"field {name!r} is empty"))
    seen_ids: dict[str, int] = {}
    for number, record in numbered:
        if record["id"] in seen_ids:
            errors.append(
                DataError(
                    path, number, f"duplicate id {record['id']!r} (first at line {seen_ids[record['id']]})"
                )
            )
        seen_ids.setdefault(record["id"], number)
    errors += [DataError(path, n, message) for n, message in duplicate_problems(numbered)]
    for number, record in numbered:
        rule = CATEGORY_RULES.get(record["category"])
        if rule and record["output"].strip():
            errors += [DataError(path, number, message) for message in rule(record)]
    if run_code:
        code_records = [(n, r) for n, r in numbered if r["category"] == "code"]
        with ThreadPoolExecutor(max_workers=4) as pool:
            for (number, _), messages in zip(
                code_records, pool.map(lambda nr: code_problems(nr[1]), code_records), strict=True
            ):
                errors += [DataError(path, number, message) for message in messages]
    counts = Counter(record["category"] for _, record in numbered)
    for category in CATEGORIES:
        if counts[category] == 0:
            errors.append(DataError(path, None, f"category {category!r} is missing"))
    present = [counts[c] for c in CATEGORIES if counts[c]]
    if present and len(set(present)) > 1:
        detail = ", ".join(f"{c}={counts[c]}" for c in CATEGORIES)
        errors.append(
            DataError(path, None, f"categories are unbalanced ({detail}); each needs the same count")
        )
    summary = {"records": len(numbered), "per_category": {c: counts[c] for c in CATEGORIES}, "words": {}}
    for field in ("instruction", "input", "output"):
        lengths = [len(r[field].split()) for _, r in numbered] or [0]
        summary["words"][field] = {
            "min": min(lengths),
            "median": statistics.median(lengths),
            "mean": round(statistics.fmean(lengths), 1),
            "max": max(lengths),
        }
    summary["with_input"] = sum(1 for _, r in numbered if r["input"].strip())
    errors.sort(key=lambda e: (e.line is None, e.line or 0))
    return summary, errors


def format_report(path: str | Path, summary: dict, errors: list[DataError]) -> str:
    lines = [f"{path}: {summary['records']} records, {summary['with_input']} with input"]
    lines += [f"  {category:<15} {count:>5}" for category, count in summary["per_category"].items()]
    lines.append("  words            min  median    mean     max")
    for field, stats in summary["words"].items():
        lines.append(
            f"  {field:<13} {stats['min']:>6} {stats['median']:>7} {stats['mean']:>7} {stats['max']:>7}"
        )
    if errors:
        lines.append(f"{len(errors)} violation(s):")
        lines += [f"  {error}" for error in errors]
    else:
        lines.append("OK: no violations")
    return "\n".join(lines)


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2)
