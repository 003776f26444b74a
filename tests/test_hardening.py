"""Bad input fails at once, on one line, leaving nothing behind; faults and interruptions lose nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparcom.cli import compose
from sparcom.data import DataFileError, load_records
from sparcom.snapshot import Snapshot, snapshot_series
from sparcom.train.sft import wandb_mode
from train import train

from helpers.models import torchrun

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> str:
    """A PYTHONPATH entry whose torch, trl and transformers fail to import: a config error reported
    through it was reported before any of them was imported (they take seconds to import)."""
    folder = tmp_path_factory.mktemp("blocked")
    for name in ("torch", "trl", "transformers"):
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(
            f"raise ImportError('{name} imported before the config check')\n"
        )
    return os.pathsep.join([str(folder), str(ROOT)])


def run_cli(script: str, overrides: list[str], cwd: Path, pythonpath: str | None = None, **env):
    environment = {**os.environ, **env}
    environment.pop("SPARCOM_RUN_STAMP", None)
    if pythonpath:
        environment["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=environment,
    )


BAD_INPUT = [
    ("train.py", ["sparcom.epsilons=[1.5]"], "sparcom.epsilons[0]: 1.5 is not a valid epsilon"),
    (
        "train.py",
        ["+trainer.args.learning_rat=1e-4"],
        "trainer.args.learning_rat: unknown key (did you mean trainer.args.learning_rate?)",
    ),
    (
        "train.py",
        ["trainer.args.learning_rat=1e-4"],
        "trainer.args.learning_rat: unknown key (did you mean trainer.args.learning_rate?)",
    ),
    ("train.py", ["trainer=lora", "trainer.peft.r=-1"], "trainer.peft.r: -1 is not allowed"),
    (
        "train.py",
        ["trainer.args.learning_rate=abc"],
        "trainer.args.learning_rate: 'abc' is not of the right type",
    ),
    ("train.py", ["model=nope"], "model: 'nope' is not a config option"),
    (
        "train.py",
        ["-m", "trainer.args.learning_rate=1e-4,3e-4", "sparcom.probe.per_category=0"],
        "sparcom.probe.per_category: 0 is not allowed",
    ),
    (
        "train.py",
        ["-m", "trainer.args.learning_rate=1e-4,abc"],
        "trainer.args.learning_rate: 'abc' is not of the right type",
    ),
    ("analyze.py", ["pairs=[{name: a, base: x}]"], "pairs[0].tuned: null"),
    (
        "analyze.py",
        ["mode=ablate", "base=x.safetensors"],
        "base: 'x.safetensors' is a snapshot, and mode=ablate needs a model",
    ),
    ("analyze.py", ["run=/nonexistent"], "run: '/nonexistent' is not a train.py run folder"),
    # A model that cannot load is refused in seconds: a path is never tried as a hub id, and a hub id
    # offline is looked up in the cache only (not retried for minutes).
    (
        "train.py",
        ["model.name_or_path=/no/such/model"],
        "model.name_or_path: '/no/such/model' does not exist",
    ),
    ("train.py", ["model.name_or_path=./my_model"], "model.name_or_path: './my_model' does not exist"),
    (
        "train.py",
        ["model.name_or_path=someorg/no-such-model"],
        "model.name_or_path: 'someorg/no-such-model' is not in the local Hugging Face cache",
    ),
    (
        "analyze.py",
        ["base=someorg/no-such-model", "tuned=tiny-llama"],
        "base: 'someorg/no-such-model' is not in the local Hugging Face cache",
    ),
    # A folder that cannot be written, before Hydra tries to make it.
    ("train.py", ["hydra.run.dir=/proc/sparcom"], "hydra.run.dir: '/proc/sparcom' cannot be created"),
    (
        "analyze.py",
        ["out=/proc/sparcom", "base=a.safetensors", "tuned=tiny-llama"],
        "base: 'a.safetensors' does not exist",
    ),
    (
        "analyze.py",
        ["out=/proc/sparcom", "base=tiny-llama", "tuned=tiny-llama"],
        "out: '/proc/sparcom' cannot be created",
    ),
    # A probe set larger than the data, or than the held-out instructions it is drawn from.
    (
        "train.py",
        ["sparcom.probe.per_category=201", "sparcom.probe_split=all"],
        "sparcom.probe.per_category: 201 is more than the 200 classification records in the data",
    ),
    (
        "train.py",
        ["sparcom.probe.per_category=30"],
        "sparcom.probe.per_category: 30 is more than the 20 classification held-out records (data.held_out)",
    ),
    ("train.py", ["data.held_out=200"], "data.held_out: 200 leaves no classification record to train on"),
    (
        "train.py",
        ["trainer.args.eval_strategy=steps", "data.held_out=0", "sparcom.probe_split=all"],
        "trainer.args.eval_strategy: 'steps' evaluates on the held-out instructions, and data.held_out is 0",
    ),
]


@pytest.mark.parametrize(("script", "overrides", "message"), BAD_INPUT)
def test_bad_input_exits_at_once_on_one_line_and_leaves_no_folder(
    tmp_path, no_torch, script, overrides, message
):
    done = run_cli(script, overrides, tmp_path, no_torch, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path.parent))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: {done.stderr[7:].strip()}"] and message in done.stderr, (
        done.stderr
    )
    assert list(tmp_path.iterdir()) == []  # no outputs/<stamp>, multirun/<stamp> or analysis/<stamp>


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"category": "math", "instruction": "x", "output": "1"\n', "mine.jsonl:1201: malformed JSON"),
        (
            '{"category": "maths", "instruction": "x", "output": "1"}\n',
            "mine.jsonl:1201: unknown category 'maths'",
        ),
    ],
)
def test_data_problems_are_refused_before_any_folder(tmp_path, no_torch, line, message):
    data = tmp_path / "data" / "mine.jsonl"
    data.parent.mkdir()
    data.write_text((ROOT / "sparcom/data/hexainst.jsonl").read_text() + line)
    work = tmp_path / "work"
    work.mkdir()
    for script, extra in (("train.py", []), ("analyze.py", ["base=tiny-llama", "tuned=tiny-llama"])):
        done = run_cli(script, [f"data.path={data}", *extra], work, no_torch)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1, (
            done.stderr
        )
        assert list(work.iterdir()) == []


@pytest.mark.slow
def test_an_analysis_refused_inside_the_job_leaves_no_folder(tmp_path):
    """Snapshots of different probe sets are found out only once loaded, after Hydra made the folder:
    the refusal removes it again."""
    import torch

    from sparcom.models.loading import load_model
    from sparcom.recording.probe import record
    from sparcom.train.sft import probe_set

    model, tokenizer = load_model("tiny-llama")
    records = load_records()
    for name, count in (("a", 1), ("b", 2)):
        with torch.no_grad():
            record(model, tokenizer, probe_set(records, count), progress=False).save(
                tmp_path / f"{name}.safetensors"
            )
    work = tmp_path / "work"
    work.mkdir()
    done = run_cli(
        "analyze.py", [f"base={tmp_path / 'a.safetensors'}", f"tuned={tmp_path / 'b.safetensors'}"], work
    )
    assert done.returncode == 2 and "different probe sets" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and list(work.iterdir()) == []


def test_hydra_full_error_shows_the_traceback(tmp_path, no_torch):
    done = run_cli("train.py", ["sparcom.epsilons=[1.5]"], tmp_path, no_torch, HYDRA_FULL_ERROR="1")
    assert done.returncode != 0 and "Traceback" in done.stderr and "ConfigError" in done.stderr
    done = run_cli("train.py", ["model=nope"], tmp_path, no_torch, HYDRA_FULL_ERROR="1")
    assert done.returncode != 0 and "Traceback" in done.stderr and "model/nope" in done.stderr


def test_a_folder_holding_a_run_is_not_overwritten(tmp_path, no_torch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    done = run_cli("train.py", [f"hydra.run.dir={run}"], tmp_path, no_torch)
    assert done.returncode == 2
    assert (
        done.stderr
        == f"error: hydra.run.dir: '{run}' already holds a run; expected a new folder, or resume=true to continue it\n"
    )
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # Hydra's .hydra/ was not written into it


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"id": "a", "category": "math"\n', r"bad.jsonl:1: malformed JSON"),
        (b'{"category": "math", "instruction": "x"}\n', r"bad.jsonl:1: missing field 'output'"),
        (b'{"category": "math", "instruction": "\xff\xfe", "output": "1"}\n', r"bad.jsonl:1: not UTF-8"),
    ],
)
def test_data_problems_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=message):
        load_records(path)


def test_user_records_need_only_category_instruction_and_output(tmp_path):
    rows = [{k: r[k] for k in ("category", "instruction", "output")} for r in load_records()]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = load_records(path)
    assert [(r["input"], r["origin"]) for r in loaded] == [("", "user")] * len(rows)
    assert len({r["id"] for r in loaded}) == len(rows) and loaded[0]["id"].startswith("classification-")
    # An id names its record's content, not its line: reordering the file keeps every id.
    path.write_text("".join(json.dumps(row) + "\n" for row in reversed(rows)))
    assert {r["id"]: r["instruction"] for r in load_records(path)} == {
        r["id"]: r["instruction"] for r in loaded
    }


def test_user_dataset_with_an_empty_category_stops_training_before_the_model_loads(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(
        "".join(
            line
            for line in (ROOT / "sparcom/data/hexainst.jsonl").read_text().splitlines(True)
            if '"category": "code"' not in line
        )
    )
    with pytest.raises(DataFileError, match=f"{data}: category 'code' has no records"):
        train(compose("train", [f"data.path={data}", "logger=disabled"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_online_without_an_api_key_logs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.warns(UserWarning, match="no API key or no network; logging offline"):
        assert wandb_mode("online") == "offline"


@pytest.mark.slow
def test_wandb_init_failure_is_a_warning_and_training_goes_on(tmp_path):
    cfg = compose("train", ["experiment=smoke", "trainer.args.max_steps=3", "logger.project=bad/name"])
    with pytest.warns(UserWarning, match=r"W&B setup failed \(UsageError: Invalid project name"):
        run = train(cfg, tmp_path / "run").run_dir
    assert sorted(snapshot_series(run / "snapshots")) == [0, 3]


@pytest.mark.slow
def test_sigkill_leaves_finished_snapshots_loadable_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=smoke",
        "logger=disabled",
        "trainer.args.max_steps=9",
        f"hydra.run.dir={run}",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and 3 not in snapshot_series(run / "snapshots"):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # mid-training, after the step-3 checkpoint and snapshot
    process.wait()
    assert process.returncode == -signal.SIGKILL
    finished = snapshot_series(run / "snapshots")
    assert 0 in finished and 3 in finished
    for path in finished.values():
        Snapshot.load(path)  # every finished snapshot is whole
    done = subprocess.run([*command, "resume=true"], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(snapshot_series(run / "snapshots")) == [0, 3, 6, 9]
    steps = [
        json.loads(line)["step"] for line in (run / "snapshots" / "drift.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 3, 6, 9]


@pytest.mark.slow
def test_a_failing_rank_ends_every_rank(tmp_path):
    started = time.perf_counter()
    done = subprocess.run(
        [
            *torchrun(),
            str(HERE / "distributed_failure.py"),
            "tiny-llama",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE,
    )
    assert done.returncode != 0
    assert "sparcom probe failed on rank 1 of 2: RuntimeError: simulated device failure" in done.stderr
    assert time.perf_counter() - started < 120


@pytest.mark.slow
def test_resume_restores_a_drift_row_a_kill_cut_off(tmp_path):
    """The narrowest kill window: after a snapshot's rename, before (or halfway through) its
    drift.jsonl row. Resuming recomputes the row from the snapshots on disk."""
    from sparcom.train.drift import drift_point, read_drift

    run = tmp_path / "run"
    smoke = ["experiment=smoke", "logger=disabled"]
    train(compose("train", [*smoke, "trainer.args.max_steps=3"]), run)
    drift = run / "snapshots" / "drift.jsonl"
    lines = drift.read_text().splitlines()
    drift.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # row 3 torn mid-write
    train(compose("train", [*smoke, "trainer.args.max_steps=6", "resume=true"]), run)
    points = read_drift(drift)
    assert [point.step for point in points] == [0, 3, 6]
    series = snapshot_series(run / "snapshots")
    base, step3 = Snapshot.load(series[0]), Snapshot.load(series[3])
    expected = drift_point(3, base, step3, base, epsilons=[0.3, 0.5, 0.7]).wandb_metrics()
    logged = points[1].wandb_metrics()
    assert all(logged[key] == pytest.approx(value, abs=1e-12) for key, value in expected.items())
