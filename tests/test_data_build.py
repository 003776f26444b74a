"""The public-source builder, run end to end on the shared GSM8K/MBPP slices and a small Dolly-schema fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sparcom.data import CATEGORIES, FIELDS

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K = SHARED / "gsm8k" / "train_first500.jsonl"
MBPP = SHARED / "mbpp" / "mbpp_not_test.jsonl"

pytestmark = pytest.mark.skipif(
    not (GSM8K.is_file() and MBPP.is_file()), reason=f"shared GSM8K/MBPP slices not found under {SHARED}"
)

# Dolly-15k schema (instruction, context, response, category), text written for these tests.
# 8 rows for each HexaInst category the builder takes from Dolly, plus closed_qa rows it must drop.
DOLLY_ROWS: list[tuple[str, str, str, str]] = [
    # classification: short, label-like answers
    ("Is a whale a fish or a mammal?", "", "A mammal.", "classification"),
    ("Classify copper as a metal or a nonmetal.", "", "Metal.", "classification"),
    ("Which planet is a gas giant: Mars or Saturn?", "", "Saturn.", "classification"),
    (
        "Tell me whether each city is in Canada or Australia: Winnipeg, Perth.",
        "",
        "Winnipeg: Canada. Perth: Australia.",
        "classification",
    ),
    (
        "Sort these into string or percussion instruments: cello, snare drum.",
        "",
        "Cello is string; snare drum is percussion.",
        "classification",
    ),
    ("Does a platypus lay eggs or give birth to live young?", "", "It lays eggs.", "classification"),
    ("Is the sentence 'Close the window.' a question or a command?", "", "A command.", "classification"),
    (
        "Identify the odd one out among oak, maple, tulip and birch.",
        "",
        "Tulip, because it is not a tree.",
        "classification",
    ),
    # an over-long classification answer: dropped by the builder
    (
        "Group the following foods by colour: banana, lime, cherry, plum, lemon, kiwi.",
        "",
        "Yellow foods are banana and lemon, green foods are lime and kiwi, red is cherry and purple is plum.",
        "classification",
    ),
    # general_qa, from open_qa and general_qa
    (
        "Why do leaves change colour in autumn?",
        "",
        "As the days shorten, trees stop making chlorophyll, so the green fades and the yellow and orange pigments underneath show through.",
        "open_qa",
    ),
    ("What is the boiling point of water at sea level in Celsius?", "", "100 degrees Celsius.", "open_qa"),
    ("How many sides does a hexagon have?", "", "Six.", "open_qa"),
    ("What gas do plants absorb from the air for photosynthesis?", "", "Carbon dioxide.", "open_qa"),
    (
        "What should I think about before adopting a dog?",
        "",
        "Consider how much time you have for walks and training, the cost of food and vet visits, the size of your home, and whether anyone in the household has allergies.",
        "general_qa",
    ),
    (
        "How can I keep a loaf of bread fresh for longer?",
        "",
        "Store it cut side down in a paper bag or bread box at room temperature, and freeze slices you will not eat within a few days.",
        "general_qa",
    ),
    (
        "What is a sensible way for an adult to start learning a new language?",
        "",
        "Practise a little every day, learn the most common words first, and speak with native speakers as early as you can, even if you make mistakes.",
        "general_qa",
    ),
    (
        "Why do runners cool down slowly after a hard race?",
        "",
        "Walking or jogging gently lets the heart rate fall gradually and keeps blood from pooling in the legs, which can otherwise cause dizziness.",
        "general_qa",
    ),
    # generation, from brainstorming and creative_writing
    (
        "Give me five names for a bakery that specialises in sourdough.",
        "",
        "Rise and Crust, The Wild Yeast, Slow Loaf, Starter Culture, Crumb and Crackle.",
        "brainstorming",
    ),
    (
        "List some indoor activities for a rainy afternoon with children.",
        "",
        "Build a blanket fort, bake biscuits, put on a puppet show, do a jigsaw puzzle, or hold a paper aeroplane contest.",
        "brainstorming",
    ),
    (
        "What are some ways to reduce household food waste?",
        "",
        "Plan meals before shopping, store leftovers in clear containers, freeze bread and ripe fruit, and compost peelings.",
        "brainstorming",
    ),
    (
        "Suggest themes for a primary school science fair.",
        "",
        "Water and weather, magnets, growing seeds, simple machines, and the night sky.",
        "brainstorming",
    ),
    (
        "Write a haiku about a lighthouse in fog.",
        "",
        "Grey breath on the sea / one slow eye sweeps the blindness / ships hum their way home",
        "creative_writing",
    ),
    (
        "Write the opening lines of a story about a clockmaker who finds a strange key.",
        "",
        "The key was warm when Ida found it, tucked inside a clock that had not ticked in forty years.",
        "creative_writing",
    ),
    (
        "Compose a limerick about a forgetful penguin.",
        "",
        "A penguin who lived on the floe / forgot where his fishing spots go / he waddled all day / in a puzzled dismay / then found them all under the snow.",
        "creative_writing",
    ),
    (
        "Write a two-sentence ghost story set in a library.",
        "",
        "Every night the returns trolley came back a little fuller. Nobody had borrowed those books in a hundred years.",
        "creative_writing",
    ),
    # summarization: a context and a shorter response
    (
        "Summarise this paragraph about the canal in one sentence.",
        "The canal was dug in the 1790s to carry coal from the hill mines to the river port. For fifty years it was busy day and night, but the railway arrived in 1846 and traffic fell away within a decade. Today it is used by walkers and narrowboats.",
        "A coal canal from the 1790s lost its trade to the railway and is now used for leisure.",
        "summarization",
    ),
    (
        "Give a brief summary of the note about the garden club.",
        "The garden club meets on the first Saturday of each month in the church hall. Members swap seeds and cuttings, and each spring the club runs a plant sale whose takings pay for the hanging baskets on the high street.",
        "The monthly garden club swaps plants and funds street baskets with a spring sale.",
        "summarization",
    ),
    (
        "What are the key points of this passage on honeybees?",
        "Honeybees communicate the location of flowers with a waggle dance. The angle of the dance relative to vertical shows the direction of the food compared with the sun, and the length of the waggle run tells the other bees how far away it is.",
        "Bees use a waggle dance whose angle and length encode direction and distance to food.",
        "summarization",
    ),
    (
        "Condense this account of the bridge repair into a single sentence.",
        "Engineers closed the old stone bridge in March after finding cracks in two of its arches. The repair took eight months because the mortar had to match the original lime mix, and the bridge reopened to cyclists and pedestrians in November.",
        "The cracked stone bridge was repaired with matching lime mortar and reopened after eight months.",
        "summarization",
    ),
    (
        "Summarize the text about the night train.",
        "The night train leaves the capital at ten in the evening and reaches the coast at dawn. Passengers can book a seat, a couchette in a six-berth cabin, or a private sleeper with a washbasin, and breakfast is served before arrival.",
        "An overnight coastal train offers seats, couchettes or sleepers and serves breakfast.",
        "summarization",
    ),
    (
        "Briefly restate what this paragraph says about the library's opening hours.",
        "From next month the library will open at nine instead of ten on weekdays, and will stay open until eight on Thursdays. Saturday hours are unchanged, and the library will remain closed on Sundays and public holidays.",
        "The library opens earlier on weekdays and later on Thursdays; weekend hours are unchanged.",
        "summarization",
    ),
    (
        "Sum up the description of the volcano in a few words.",
        "The volcano last erupted about four thousand years ago. Its crater now holds a deep blue lake, and the slopes are covered in pine forest that is home to deer, wild boar and several rare species of orchid.",
        "A long-dormant volcano with a crater lake and forested, orchid-rich slopes.",
        "summarization",
    ),
    (
        "Write a short summary of the report on the school's recycling scheme.",
        "In its first year the school's recycling scheme cut the amount of rubbish sent to landfill by almost half. Pupils sorted paper, cans and food waste at lunch, and the money saved on collection fees bought new books for the library.",
        "The school halved its landfill waste by recycling and spent the savings on books.",
        "summarization",
    ),
    # closed_qa has no HexaInst category: dropped
    (
        "According to the text, when did the museum open?",
        "The museum opened in 1932 in a former wool warehouse.",
        "In 1932.",
        "closed_qa",
    ),
    (
        "Based on the passage, what was the warehouse used for?",
        "The museum opened in 1932 in a former wool warehouse.",
        "Storing wool.",
        "closed_qa",
    ),
]


def write_dolly(path: Path, rows: list[tuple[str, str, str, str]] = DOLLY_ROWS) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for instruction, context, response, category in rows:
            row = {"instruction": instruction, "context": context, "response": response, "category": category}
            handle.write(json.dumps(row) + "\n")
    return path


def run_cli(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sparcom.data", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Offline, with the datasets cache kept out of the user's home."""
    cache = tmp_path_factory.mktemp("hf-cache")
    return {
        **os.environ,
        "HF_HOME": str(cache),
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def dolly(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dolly(tmp_path_factory.mktemp("dolly") / "dolly.jsonl")


def build(out: Path, seed: int, dolly: Path, env: dict[str, str], per_category: int = 5):
    options = {"--out": out, "--per-category": per_category, "--seed": seed, "--dolly": dolly}
    options |= {"--gsm8k": GSM8K, "--mbpp": MBPP}
    return run_cli("build", *(str(part) for option in options.items() for part in option), env=env)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, dolly: Path, env: dict[str, str]) -> dict[str, Path]:
    """The same build twice with seed 0 and once with seed 1."""
    folder = tmp_path_factory.mktemp("built")
    outputs = {}
    for name, seed in (("seed0", 0), ("seed0-again", 0), ("seed1", 1)):
        out = folder / f"{name}.jsonl"
        done = build(out, seed, dolly, env)
        assert done.returncode == 0, f"build {name} failed:\n{done.stdout}\n{done.stderr}"
        outputs[name] = out
    return outputs


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_build_gives_a_balanced_sample_with_provenance(built: dict[str, Path]) -> None:
    records = read(built["seed0"])
    assert len(records) == 30
    assert Counter(r["category"] for r in records) == dict.fromkeys(CATEGORIES, 5)
    for record in records:
        assert set(FIELDS) <= set(record), record
        assert record["origin"] and record["license"], record
    licenses = {r["category"]: r["license"] for r in records}
    assert licenses["math"] == "MIT" and licenses["code"] == "CC BY 4.0"
    assert {licenses[c] for c in ("classification", "general_qa", "generation", "summarization")} == {
        "CC BY-SA 3.0"
    }
    assert len({r["id"] for r in records}) == 30
    assert len({r["instruction"] for r in records}) == 30
    # closed_qa rows and the over-long classification answer have no place in HexaInst
    dropped = {
        row[0]
        for row in DOLLY_ROWS
        if row[3] == "closed_qa" or (row[3] == "classification" and len(row[2].split()) > 10)
    }
    assert dropped and not dropped & {r["instruction"] for r in records}


def test_build_is_seeded(built: dict[str, Path]) -> None:
    assert built["seed0"].read_bytes() == built["seed0-again"].read_bytes()
    assert read(built["seed0"]) != read(built["seed1"])


def test_built_file_passes_the_validator(built: dict[str, Path], env: dict[str, str]) -> None:
    done = run_cli("validate", built["seed0"], env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: no violations" in done.stdout


@pytest.mark.parametrize(
    ("rows", "per_category", "short"),
    [
        pytest.param(DOLLY_ROWS, 9, "classification", id="more-than-any-dolly-category"),
        pytest.param(
            [row for row in DOLLY_ROWS if row[3] != "summarization"]
            + [row for row in DOLLY_ROWS if row[3] == "summarization"][:4],
            5,
            "summarization",
            id="only-summarization-short",
        ),
    ],
)
def test_build_refuses_more_than_a_source_gives(
    tmp_path: Path, env: dict[str, str], rows: list, per_category: int, short: str
) -> None:
    out = tmp_path / "out.jsonl"
    done = build(out, 0, write_dolly(tmp_path / "dolly.jsonl", rows), env, per_category)
    assert done.returncode != 0
    assert f"category {short!r}" in done.stderr
    assert not out.exists()
