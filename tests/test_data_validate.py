"""HexaInst's schema, loader and quality rules: the shipped file, each rule on a small file, and fuzzing."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparcom.data import CATEGORIES, FIELDS, DataFileError, hexainst_path, load_records, read_jsonl
from sparcom.data.__main__ import main
from sparcom.data.validate import equations, math_problems, validate_file

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ a small valid file

# Two records per category; every test below breaks exactly one rule in a copy of them.
VALID: list[dict[str, str]] = [
    {
        "category": "classification",
        "instruction": 'Label the mood of this sentence as "happy" or "sad".',
        "input": "We finally won the championship after ten long years of trying!",
        "output": "happy",
    },
    {
        "category": "classification",
        "instruction": 'Is the animal described a "mammal", "bird" or "reptile"?',
        "input": "It has feathers and a beak, and it lays eggs in a nest it weaves from grass.",
        "output": "Bird.",
    },
    {
        "category": "code",
        "instruction": "Write a Python function that returns the square of a number, with a doctest.",
        "input": "",
        "output": (
            "```python\n"
            "def square(x):\n"
            '    """Return x squared.\n\n'
            "    >>> square(3)\n"
            "    9\n"
            '    """\n'
            "    return x * x\n\n\n"
            "assert square(-4) == 16\n"
            "```"
        ),
    },
    {
        "category": "code",
        "instruction": "Reverse a string in Python.",
        "input": "",
        "output": 'def reverse(text):\n    return text[::-1]\n\n\nassert reverse("abc") == "cba"',
    },
    {
        "category": "general_qa",
        "instruction": "What is the capital city of Japan?",
        "input": "",
        "output": "Tokyo.",
    },
    {
        "category": "general_qa",
        "instruction": "Why does ice float on water?",
        "input": "",
        "output": "Ice is less dense than liquid water because its molecules form an open crystal lattice.",
    },
    {
        "category": "generation",
        "instruction": "Write a two-line poem about autumn rain.",
        "input": "",
        "output": "Grey drops drum the fallen leaves,\nthe garden hums beneath the eaves.",
    },
    {
        "category": "generation",
        "instruction": "Suggest three names for a pet tortoise.",
        "input": "",
        "output": "Pebble, Sheldon and Captain Slow.",
    },
    {
        "category": "math",
        "instruction": "A baker makes 12 loaves a day for 5 days. How many loaves does she make?",
        "input": "",
        "output": "She makes 12 × 5 = 60 loaves.\nFinal answer: 60",
    },
    {
        "category": "math",
        "instruction": "Sam has 25 marbles, gives 7 away and shares the rest equally among 3 friends. "
        "How many marbles does each friend get?",
        "input": "",
        "output": "After giving some away, 25 − 7 = 18 marbles are left.\nEach friend gets 18 ÷ 3 = 6.\n"
        "Final answer: 6",
    },
    {
        "category": "summarization",
        "instruction": "Summarise the passage in one sentence.",
        "input": "The old mill on the river was built in 1820 to grind wheat for the village. It closed a "
        "century later when a larger mill opened in town, and after years of neglect a trust "
        "restored it as a museum that now grinds flour for visitors on summer weekends.",
        "output": "A restored 1820 village mill now works as a museum.",
    },
    {
        "category": "summarization",
        "instruction": "Give a short summary of this note from the school.",
        "input": "Because of the storm forecast for Friday, the school will close at noon. Buses will "
        "leave at a quarter past twelve, and parents collecting children by car are asked to "
        "arrive by then. Afternoon clubs are cancelled.",
        "output": "School closes early on Friday because of a storm.",
    },
]
for _i, _record in enumerate(VALID):
    _record["id"] = f"test-{_i + 1:03d}"
    _record["origin"] = "test"

LINE = {  # 1-based line of each record in the file written from VALID
    "classification": 1,
    "code": 3,
    "code2": 4,
    "general_qa": 5,
    "general_qa2": 6,
    "generation": 7,
    "math": 9,
    "math2": 10,
    "summarization": 11,
}


def records() -> list[dict[str, str]]:
    return [dict(r) for r in VALID]


def write(path: Path, rows: list[dict[str, str] | str | bytes]) -> Path:
    """Write records (dicts as JSON, strings and bytes as they are) one per line."""
    lines = []
    for row in rows:
        if isinstance(row, dict):
            row = json.dumps(row, ensure_ascii=False)
        lines.append(row if isinstance(row, bytes) else row.encode("utf-8"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    """``python -m sparcom.data ARGS`` in this process: (exit status, stdout + stderr)."""
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def assert_violation(status: int, output: str, line: int | None, pattern: str) -> None:
    assert status != 0, output
    where = r"\.jsonl" + (f":{line}" if line is not None else "")
    assert re.search(where + r": .*" + pattern, output), f"no {pattern!r} at line {line} in:\n{output}"


def test_small_valid_file_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, output = cli(capsys, "validate", write(tmp_path / "ok.jsonl", records()))
    assert status == 0, output
    assert "OK: no violations" in output
    for category in CATEGORIES:
        assert re.search(rf"^\s+{category}\s+2$", output, re.MULTILINE), output
    assert load_records(tmp_path / "ok.jsonl") == records()


# --------------------------------------------------------------------- each rule, one by one


def _exact_duplicate(rows: list[dict]) -> None:
    rows[5]["instruction"] = "what is the CAPITAL city of japan"  # same as line 5 once normalised


def _near_duplicate(rows: list[dict]) -> None:
    rows[5]["instruction"] = "What is the capital city of Japan, please?"  # 6 of 7 bigrams shared


def _invalid_python(rows: list[dict]) -> None:
    rows[2]["output"] = "```python\ndef square(x)\n    return x * x\n```"


def _failing_assert(rows: list[dict]) -> None:
    rows[3]["output"] = rows[3]["output"].replace('== "cba"', '== "abc"')


def _failing_doctest(rows: list[dict]) -> None:
    rows[2]["output"] = rows[2]["output"].replace("    9\n", "    10\n")


def _wrong_equation(rows: list[dict]) -> None:
    rows[9]["output"] = (
        "After giving some away, 25 − 7 = 18 marbles are left.\nEach friend gets 18 ÷ 3 = 5.\nFinal answer: 5"
    )


def _wrong_final_answer(rows: list[dict]) -> None:
    rows[8]["output"] = rows[8]["output"].replace("Final answer: 60", "Final answer: 65")


def _missing_final_line(rows: list[dict]) -> None:
    rows[8]["output"] = "She makes 12 × 5 = 60 loaves."


def _label_not_offered(rows: list[dict]) -> None:
    rows[0]["output"] = "excited"


def _long_summary(rows: list[dict]) -> None:
    rows[10]["output"] = rows[10]["input"] + " In short, a mill."


def _missing_field(rows: list[dict]) -> None:
    del rows[6]["origin"]


def _non_string_field(rows: list[dict]) -> None:
    rows[6]["output"] = ["not", "a", "string"]


def _unknown_category(rows: list[dict]) -> None:
    rows.append({**rows[6], "id": "test-013", "category": "poetry", "instruction": "Write an ode to soup."})


def _duplicate_id(rows: list[dict]) -> None:
    rows[6]["id"] = rows[4]["id"]


def _empty_output(rows: list[dict]) -> None:
    rows[6]["output"] = "  "


@pytest.mark.parametrize(
    ("mutate", "line", "pattern"),
    [
        pytest.param(_exact_duplicate, 6, r"duplicate instruction \(same as line 5\)", id="duplicate"),
        pytest.param(_near_duplicate, 6, r"near-duplicate of line 5", id="near-duplicate"),
        pytest.param(_invalid_python, 3, r"code output is not valid Python", id="code-syntax"),
        pytest.param(_failing_assert, 4, r"code output fails when run: AssertionError", id="code-assert"),
        pytest.param(_failing_doctest, 3, r"code output fails when run", id="code-doctest"),
        pytest.param(_wrong_equation, 10, r"equation 18 / 3 = 5 is wrong \(it is 6\)", id="math-equation"),
        pytest.param(_wrong_final_answer, 9, r"final answer 65 differs .* 60", id="math-final-answer"),
        pytest.param(_missing_final_line, 9, r"must end with a line 'Final answer: N'", id="math-no-final"),
        pytest.param(_label_not_offered, 1, r"'excited' is not one of the offered labels", id="label"),
        pytest.param(_long_summary, 11, r"summary has \d+ words, not fewer than", id="long-summary"),
        pytest.param(_missing_field, 7, r"missing field 'origin'", id="missing-field"),
        pytest.param(_non_string_field, 7, r"field 'output' must be a string", id="non-string-field"),
        pytest.param(_unknown_category, 13, r"unknown category 'poetry'", id="unknown-category"),
        pytest.param(_duplicate_id, 7, r"duplicate id 'test-005' \(first at line 5\)", id="duplicate-id"),
        pytest.param(_empty_output, 7, r"field 'output' is empty", id="empty-output"),
    ],
)
def test_rule_catches_its_violation(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mutate: Callable[[list[dict]], None],
    line: int,
    pattern: str,
) -> None:
    rows = records()
    mutate(rows)
    status, output = cli(capsys, "validate", write(tmp_path / "bad.jsonl", rows))
    assert_violation(status, output, line, pattern)


def test_near_duplicate_is_not_an_exact_duplicate(tmp_path: Path) -> None:
    rows = records()
    _near_duplicate(rows)
    _, errors = validate_file(write(tmp_path / "near.jsonl", rows), run_code=False)
    assert [(e.line, e.message.split(" (")[0]) for e in errors] == [(6, "near-duplicate of line 5")]


def test_missing_category(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [r for r in records() if r["category"] != "generation"]
    status, output = cli(capsys, "validate", write(tmp_path / "bad.jsonl", rows))
    assert_violation(status, output, None, r"category 'generation' is missing")
    assert "unbalanced" not in output  # the five present categories still have two each


def test_unbalanced_categories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = records()
    del rows[LINE["math2"] - 1]
    status, output = cli(capsys, "validate", write(tmp_path / "bad.jsonl", rows))
    assert_violation(status, output, None, r"categories are unbalanced \(.*math=1.*\)")
    assert "missing" not in output


def test_malformed_json_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows: list = records()
    rows.insert(3, '{"id": "test-099", "category": "code", "instruction": ')
    rows.insert(8, "[1, 2, 3]")
    status, output = cli(capsys, "validate", write(tmp_path / "bad.jsonl", rows))
    assert_violation(status, output, 4, r"malformed JSON")
    assert_violation(status, output, 9, r"expected a JSON object, got list")
    assert "2 violation(s)" in output, output  # the other ten records are still fine and balanced


def test_non_utf8_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows: list = records()
    rows[6] = json.dumps(rows[6]).encode("utf-8").replace(b"autumn", b"autumn \xff\xfe")
    status, output = cli(capsys, "validate", write(tmp_path / "bad.jsonl", rows))
    assert_violation(status, output, 7, r"not UTF-8")


def test_lone_surrogate_escape_is_reported_not_raised(tmp_path: Path) -> None:
    rows: list = records()
    rows[2] = json.dumps(rows[2]).replace("return x * x", "return x * x  # \\ud800")
    summary, errors = validate_file(write(tmp_path / "bad.jsonl", rows))  # runs the code rule
    assert any(e.line == 3 and "surrogate" in e.message for e in errors), errors


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    rows: list = records()
    rows.insert(2, "")
    rows.insert(3, "   ")
    rows[0]["output"] = "excited"
    rows[11]["output"] = rows[11]["output"].replace("= 18", "= 19")  # the second math record, line 12
    _, errors = validate_file(write(tmp_path / "blank.jsonl", rows), run_code=False)
    assert [e.line for e in errors] == [1, 12]


def test_missing_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, output = cli(capsys, "validate", tmp_path / "nowhere.jsonl")
    assert status == 2 and "no such file" in output


# ------------------------------------------------------------------------------ the shipped file


def synthetic_complete_records(per_category: int = 200, seed: int = 0) -> list[dict[str, str]]:
    """A file shaped like the complete shipped one (``per_category`` of each) that passes every rule."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(10**9)}" for _ in range(n))

    rows = []
    for category in CATEGORIES:
        for i in range(per_category):
            a, b = rng.randrange(1, 1000), rng.randrange(1, 1000)
            instruction, text, output = f"Do {words(6)}.", "", words(4)
            if category == "classification":
                instruction, output = f'Label {words(5)} as "alpha" or "beta".', rng.choice(["alpha", "beta"])
            elif category == "code":
                output = f"```python\ndef f{i}(x):\n    return x + {a}\n\n\nassert f{i}({b}) == {a + b}\n```"
            elif category == "math":
                output = f"We add {words(2)}: {a} + {b} = {a + b}.\nFinal answer: {a + b}"
            elif category == "summarization":
                text = words(30)
            rows.append(
                {
                    "id": f"{category}-{i + 1:03d}",
                    "category": category,
                    "instruction": instruction,
                    "input": text,
                    "output": output,
                    "origin": "sparcom",
                }
            )
    return rows


def assert_complete(path: Path, *options: str) -> None:
    """``python -m sparcom.data validate PATH`` exits 0 and reports 200 records in each category."""
    done = subprocess.run(
        [sys.executable, "-m", "sparcom.data", "validate", str(path), *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = done.stdout + done.stderr
    tail = "\n".join(report.splitlines()[-40:])
    assert done.returncode == 0, f"validate exited {done.returncode}:\n{tail}"
    counts = dict(re.findall(r"^\s+(\w+)\s+(\d+)$", done.stdout, re.MULTILINE))
    assert {c: counts.get(c) for c in CATEGORIES} == dict.fromkeys(CATEGORIES, "200"), tail
    assert re.search(r": 1200 records", done.stdout), tail


def test_shipped_hexainst_passes_every_rule() -> None:
    assert_complete(hexainst_path())


def test_complete_file_check_on_a_synthetic_file(tmp_path: Path) -> None:
    """The check above on made-up files (code not executed, to keep it fast): it passes a complete
    file, and fails one with a violation and a valid one with the wrong counts."""
    rows = synthetic_complete_records()
    assert_complete(write(tmp_path / "complete.jsonl", rows), "--skip-code")
    with pytest.raises(AssertionError, match="validate exited 1"):
        assert_complete(write(tmp_path / "unbalanced.jsonl", rows[:-1]), "--skip-code")
    with pytest.raises(AssertionError, match="'199'"):
        assert_complete(write(tmp_path / "small.jsonl", synthetic_complete_records(199)), "--skip-code")


def test_synthetic_file_code_runs(tmp_path: Path) -> None:
    """The synthetic file's code records really pass the code rule (a few of them, executed)."""
    rows = [r for r in synthetic_complete_records() if r["category"] == "code"][:3]
    _, errors = validate_file(write(tmp_path / "code.jsonl", rows))
    assert [e.message for e in errors if e.line is not None] == []


def test_load_shipped_records() -> None:
    rows = load_records()
    assert len(rows) == 1200
    assert all(set(FIELDS) <= set(r) for r in rows)
    assert [r["category"] for r in load_records(categories=("math",))] == ["math"] * 200


# ------------------------------------------------------------------------------ load_records


def test_load_records_names_file_and_line_of_a_malformed_line(tmp_path: Path) -> None:
    rows: list = records()
    rows.insert(4, "{not json")
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataFileError) as caught:
        load_records(path)
    assert f"{path}:5: malformed JSON" in str(caught.value)
    assert [(e.path, e.line) for e in caught.value.errors] == [(str(path), 5)]


def test_load_records_names_an_empty_category(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl", [r for r in records() if r["category"] != "summarization"])
    with pytest.raises(DataFileError) as caught:
        load_records(path)
    assert f"{path}: category 'summarization' has no records" in str(caught.value)
    assert [e.line for e in caught.value.errors] == [None]
    # asking only for categories that are there is fine
    assert len(load_records(path, categories=("code", "math"))) == 4


def test_load_records_rejects_an_unknown_category(tmp_path: Path) -> None:
    rows = records()
    rows[4]["category"] = "trivia"
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataFileError, match=rf"{re.escape(str(path))}:5: unknown category 'trivia'"):
        load_records(path)


def test_load_records_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_records(tmp_path / "nowhere.jsonl")


def test_data_file_error_message_is_capped() -> None:
    from sparcom.data import DataError

    error = DataFileError([DataError("f.jsonl", n, "bad") for n in range(1, 31)])
    assert "\n" not in str(error) and len(error.errors) == 30
    assert str(error).startswith("30 problems in data: f.jsonl:1: bad; f.jsonl:2: bad; f.jsonl:3: bad; ...")
    assert "f.jsonl:4" not in str(error) and "27 more; `python -m sparcom.data validate f.jsonl`" in str(
        error
    )
    assert str(DataFileError([DataError("f.jsonl", 5, "bad")])) == "f.jsonl:5: bad"


# -------------------------------------------------------------------- equations, math_problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 3 + 4 = 7 apples.", [("3 + 4", 7.0, 7.0, 0)]),
        ("12 × 3 = 36, then 36 ÷ 4 = 9", [("12 * 3", 36.0, 36.0, 0), ("36 / 4", 9.0, 9.0, 0)]),
        ("10 − 3 = 7 and −3 × −2 = 6", [("10 - 3", 7.0, 7.0, 0), ("-3 * -2", 6.0, 6.0, 0)]),
        ("A temperature change of -3 + 5 = 2 degrees", [("-3 + 5", 2.0, 2.0, 0)]),
        ("Total: (2 + 3) * 4 = 20.", [("(2 + 3) * 4", 20.0, 20.0, 0)]),
        ("(the sum 8 + 1) = 9", [("8 + 1", 9.0, 9.0, 0)]),
        ("7 - 10 = -3", [("7 - 10", -3.0, -3.0, 0)]),
        ("Each gets 10 / 3 = 3.33 litres", [("10 / 3", 10 / 3, 3.33, 2)]),
        ("0.2*50=10", [("0.2*50", 10.0, 10.0, 0)]),
        ("3 + 4 = 7.5", [("3 + 4", 7.0, 7.5, 1)]),
        # numbers in the prose before an equation are not part of it
        ("In 2020 there were 5 cats. 10 / 5 = 2 each", [("10 / 5", 2.0, 2.0, 0)]),
        ("He is 30 years old; 2 * 3 = 6", [("2 * 3", 6.0, 6.0, 0)]),
        ("The 2 (two) boxes hold 3 + 4 = 7", [("3 + 4", 7.0, 7.0, 0)]),
        ("2 + 3 = 5. 5 * 2 = 10", [("2 + 3", 5.0, 5.0, 0), ("5 * 2", 10.0, 10.0, 0)]),
        # no operator, a right side that is an expression, a variable, money, division by zero
        ("In 2020 = year 5", []),
        ("x = 2 + 3", []),
        ("5 = 5", []),
        ("x*3 = 6", []),
        ("8 = 2 + 6", []),
        ("Weng earns 12/60 = $0.2 a minute", []),
        ("6/0 = 1", []),
        ("", []),
    ],
)
def test_equations(text: str, expected: list[tuple[str, float, float, int]]) -> None:
    found = equations(text)
    assert [(e, pytest.approx(c), s, d) for e, c, s, d in found] == expected


@pytest.mark.parametrize(
    "text",
    ["1" * 400 + " + 1 = 2", "+".join(["1"] * 3000) + " = 3000", "(" * 300 + "1" + ")" * 300 + " + 1 = 2"],
    ids=["float-overflow", "deep-sum", "deep-parentheses"],
)
def test_equations_survive_pathological_arithmetic(text: str) -> None:
    assert equations(text) == []


def _math(output: str) -> list[str]:
    return math_problems({"output": output})


@pytest.mark.parametrize(
    ("output", "problems"),
    [
        ("2 + 3 = 5\nFinal answer: 5", []),
        ("She pays 3 × 4 = 12 and gets 20 − 12 = 8 back.\nFinal answer: 8", []),
        ("10 / 3 = 3.33 each\nFinal answer: 3.33", []),  # rounded to the stated places
        ("2 / 3 = 0.67\nFinal answer: 0.67", []),
        ("2 / 3 = 0.66\nFinal answer: 0.66", ["equation 2 / 3 = 0.66 is wrong (it is 0.666667)"]),
        (
            "10 / 3 = 3.3\nFinal answer: 3.33",
            ["final answer 3.33 differs from the last equation's value 3.3"],
        ),
        ("10 / 3 = 3.33\nFinal answer: 3", ["final answer 3 differs from the last equation's value 3.33"]),
        ("2 + 3 = 6\nFinal answer: 6", ["equation 2 + 3 = 6 is wrong (it is 5)"]),
        ("2 + 3 = 5\nFinal answer: 6", ["final answer 6 differs from the last equation's value 5"]),
        ("7 - 10 = -3\nFinal answer: -3", []),
        ("  2 + 2 = 4\n\nFinal answer: 4\n\n", []),
        (
            "It costs 5 dollars.\nFinal answer: 5",
            ["math output has no 'EXPR = VALUE' equation to check the answer against"],
        ),
        ("2 + 3 = 5", ["math output must end with a line 'Final answer: N'"]),
        ("2 + 3 = 5\nFinal answer: five", ["math output must end with a line 'Final answer: N'"]),
        ("", ["math output must end with a line 'Final answer: N'"]),
        (
            "Tom has 3 bags. 3 * 4 = 13 apples. Then 13 + 2 = 15.\nFinal answer: 15",
            ["equation 3 * 4 = 13 is wrong (it is 12)"],
        ),
    ],
)
def test_math_problems(output: str, problems: list[str]) -> None:
    assert _math(output) == problems


# --------------------------------------------------------------------------------- fuzzing

RECORD_TEXT = st.text(alphabet="0123456789 +-*/().=×÷−\nFinal answer:\"'abc", max_size=60)
RECORD = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["a", "b", "c"]),
        "category": st.sampled_from([*CATEGORIES, "other"]),
        "instruction": st.one_of(RECORD_TEXT, st.text(max_size=30)),
        "input": st.one_of(RECORD_TEXT, st.text(max_size=30)),
        "output": st.one_of(RECORD_TEXT, st.text(max_size=30)),
        "origin": st.just("fuzz"),
    },
    optional={"license": st.one_of(st.text(max_size=5), st.integers())},
)
JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        return draw(st.text(max_size=40)).encode("utf-8", "surrogatepass")
    if kind == 2:
        return json.dumps(draw(JSON)).encode()
    record = json.dumps(draw(RECORD), ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == 3:  # truncated
        return record[: draw(st.integers(0, len(record)))]
    if kind == 4:  # a field removed or retyped
        data = json.loads(record)
        key = draw(st.sampled_from(sorted(data)))
        if draw(st.booleans()):
            del data[key]
        else:
            data[key] = draw(JSON)
        return json.dumps(data).encode()
    return record


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines(), max_size=12), st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_fuzz_reader_and_validator_never_raise(
    body: list[bytes], newline: bytes, final_newline: bool
) -> None:
    data = newline.join(body) + (newline if final_newline else b"")
    line_count = len(data.split(b"\n"))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.jsonl"
        path.write_bytes(data)
        numbered, read_errors = read_jsonl(path)
        summary, errors = validate_file(path, run_code=False)
    assert all(1 <= number <= line_count for number, _ in numbered)
    assert all(set(FIELDS) <= set(record) for _, record in numbered)
    for error in [*read_errors, *errors]:
        assert error.line is None or 1 <= error.line <= line_count, error
        assert error.path == str(path)
    assert summary["records"] == len(numbered)
    assert sum(summary["per_category"].values()) <= len(numbered)
    # every problem the reader found, the validator reports too
    assert {(e.line, e.message) for e in read_errors} <= {(e.line, e.message) for e in errors}


def test_reader_reports_a_deeply_nested_line(tmp_path: Path) -> None:
    path = write(tmp_path / "deep.jsonl", [records()[0], "[" * 100_000])
    numbered, errors = read_jsonl(path)
    assert [n for n, _ in numbered] == [1]
    assert [(e.line, e.message) for e in errors] == [(2, "malformed JSON: nested too deeply")]


def test_exact_duplicate_is_reported_once(tmp_path: Path) -> None:
    rows = records()
    rows[5]["instruction"], rows[5]["input"] = rows[4]["instruction"], rows[4]["input"]
    _, errors = validate_file(write(tmp_path / "dup.jsonl", rows), run_code=False)
    assert [(e.line, e.message) for e in errors] == [(6, "duplicate instruction (same as line 5)")]
