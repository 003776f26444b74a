"""Bad input fails early and clearly; faults and interruptions lose nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from sparcom.config_check import ConfigError, check_analyze, check_probe_fits, check_train
from sparcom.data import DataFileError, load_records
from sparcom.snapshot import Snapshot, snapshot_series
from sparcom.training import configure_wandb, sft_defaults

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent


def composed(name: str, overrides: list[str]):
    ConfigStore.instance().store(name="sft_args", node=sft_defaults())
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "sparcom.epsilons=[0.5,1.5]",
            r"sparcom.epsilons\[1\]: 1.5 is not a valid epsilon; expected a number in \(0, 1\]",
        ),
        ("sparcom.epsilons=[0]", r"sparcom.epsilons\[0\]: 0 is not a valid epsilon"),
        (
            "data.categories=[math,poetry]",
            r"data.categories\[1\]: 'poetry' is unknown; expected one of classification",
        ),
        (
            "model.name_or_path=tiny-gpt",
            r"model.name_or_path: 'tiny-gpt' is not a tiny preset; expected one of tiny-llama",
        ),
        (
            "sparcom.token_scope=everything",
            r"sparcom.token_scope: 'everything' is unknown; expected one of prompt, response, all",
        ),
        (
            "sparcom.selection_mode=top",
            r"sparcom.selection_mode: 'top' is unknown; expected one of threshold",
        ),
        (
            "trainer.args.save_steps=0",
            r"trainer.args.save_steps: 0 is not allowed; expected a positive integer",
        ),
        (
            "sparcom.record.every_steps=-2",
            r"sparcom.record.every_steps: -2 is not allowed; expected a positive integer or null",
        ),
        (
            "deepspeed.config=/nope/ds.json",
            r"deepspeed.config: '/nope/ds.json' does not exist; expected a DeepSpeed JSON",
        ),
        ("logger.mode=loud", r"logger.mode: 'loud' is unknown; expected one of online, offline, disabled"),
    ],
)
def test_bad_train_config_is_named_on_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        check_train(composed("train", [override]))
    assert "\n" not in str(caught.value)


def test_probe_larger_than_the_data_is_refused():
    with pytest.raises(
        ConfigError, match="sparcom.probe.per_category: 201 is more than the 200 classification records"
    ):
        check_probe_fits(load_records(), 201)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epsilons=[2]", r"epsilons\[0\]: 2 is not a valid epsilon"),
        ("mode=explain", r"mode: 'explain' is unknown; expected one of compare, ablate"),
        ("run=/nonexistent", r"run: '/nonexistent' is not a train.py run folder"),
        ("base=x.safetensors", r"base: 'x.safetensors' does not exist"),
    ],
)
def test_bad_analyze_config_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        check_analyze(composed("analyze", [override, "tuned=y"]))


def test_bad_input_exits_early_without_a_traceback(tmp_path):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "sparcom.epsilons=[1.5]", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: sparcom.epsilons[0]: 1.5")
    assert "Traceback" not in done.stderr and "Loading weights" not in done.stderr + done.stdout
    assert time.perf_counter() - started < 60
    shown = subprocess.run([sys.executable, str(ROOT / "train.py"), "sparcom.epsilons=[1.5]", f"hydra.run.dir={tmp_path}"],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "1"})  # fmt: skip
    assert shown.returncode != 0 and "Traceback" in shown.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"id": "a", "category": "math"\n', r"bad.jsonl:1: malformed JSON"),
        (b'{"id": "a", "category": "math", "instruction": "x", "input": "", "origin": "t"}\n', r"bad.jsonl:1: missing field 'output'"),
        (b'{"id": "a", "category": "math", "instruction": "\xff\xfe", "input": "", "output": "1", "origin": "t"}\n',
         r"bad.jsonl:1: not UTF-8"),
    ],
)  # fmt: skip
def test_data_problems_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=message):
        load_records(path)


def test_user_dataset_with_an_empty_category_stops_train_py(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(line for line in (ROOT / "sparcom/data/hexainst.jsonl").read_text().splitlines(True)
                            if '"category": "code"' not in line))  # fmt: skip
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), f"data.path={data}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert f"{data}: category 'code' has no records" in done.stderr and "Traceback" not in done.stderr


def test_online_without_an_api_key_logs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.warns(UserWarning, match="no API key or no network; logging offline"):
        assert configure_wandb("online", "p", tmp_path, None, None, None) == "offline"
    assert os.environ["WANDB_MODE"] == "offline"


@pytest.mark.slow
def test_wandb_init_failure_is_a_warning_and_training_goes_on(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "logger.project=bad/name",
                           f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "W&B setup failed (UsageError: Invalid project name" in done.stderr
    assert sorted(snapshot_series(run / "snapshots")) == [0, 3, 6]


@pytest.mark.slow
def test_sigkill_leaves_finished_snapshots_loadable_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "logger=disabled", "trainer.args.max_steps=9",
               f"hydra.run.dir={run}"]  # fmt: skip
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
        int(line.split(",")[0].split(":")[1])
        for line in (run / "snapshots" / "drift.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 3, 6, 9]


@pytest.mark.slow
def test_a_failing_rank_ends_every_rank(tmp_path):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "distributed_failure.py"), "tiny-llama"], capture_output=True, text=True,
                          timeout=300, cwd=HERE)  # fmt: skip
    assert done.returncode != 0
    assert "sparcom probe failed on rank 1 of 2: RuntimeError: simulated device failure" in done.stderr
    assert time.perf_counter() - started < 120


@pytest.mark.slow
def test_resume_restores_a_drift_row_a_kill_cut_off(tmp_path):
    """The narrowest kill window: after a snapshot's rename, before (or halfway through) its
    drift.jsonl row. Resuming recomputes the row from the snapshots on disk."""
    from sparcom.drift import drift_metrics

    run = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=smoke",
        "logger=disabled",
        f"hydra.run.dir={run}",
    ]
    assert (
        subprocess.run([*command, "trainer.args.max_steps=3"], capture_output=True, timeout=400).returncode
        == 0
    )
    drift = run / "snapshots" / "drift.jsonl"
    lines = drift.read_text().splitlines()
    drift.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # row 3 torn mid-write
    done = subprocess.run([*command, "trainer.args.max_steps=6", "resume=true"], capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in drift.read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 3, 6]
    series = snapshot_series(run / "snapshots")
    expected = drift_metrics(
        Snapshot.load(series[0]), Snapshot.load(series[3]), [0.3, 0.5, 0.7], "threshold", "base"
    )
    assert all(rows[1][key] == pytest.approx(value, abs=1e-12) for key, value in expected.items())
