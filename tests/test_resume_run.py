"""A resumed run is the run it continues: its own config (extended only in steps), its own probe
set, its own W&B run; an interrupted run says where it stopped and how to go on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from sparcom.cli import checked_launch, compose
from sparcom.config import as_plain
from sparcom.errors import ConfigError
from sparcom.snapshot import snapshot_series
from sparcom.train.run_folder import flat, launch_overrides, record_resume, resume_changes, run_config

from helpers import wandb_log

ROOT = Path(__file__).resolve().parents[1]


def finished_run(folder: Path, overrides: list[str]) -> Path:
    """A run folder as a launch with ``overrides`` leaves it: config.yaml, Hydra's record, a checkpoint."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(compose("train", overrides))))
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "trainer_state.json").write_text("{}")
    return folder


SMOKE = ["experiment=smoke", "trainer.args.max_steps=60", "trainer.args.save_steps=5"]


def test_resume_true_restores_the_runs_own_overrides(tmp_path):
    run = finished_run(tmp_path / "run", SMOKE)
    argv = checked_launch("train", [f"hydra.run.dir={run}", "resume=true"])
    cfg = compose("train", [o for o in argv if not o.startswith("hydra.")])
    assert cfg.trainer.args.max_steps == 60 and cfg.trainer.args.save_steps == 5
    assert cfg.trainer.args.per_device_train_batch_size == 4 and cfg.sparcom.probe.per_category == 4
    assert "hydra.output_subdir=null" in argv  # Hydra's record of the first launch is left as it is
    assert resume_changes(flat(as_plain(cfg)), run) == {}


def test_a_resume_may_only_extend_the_run(tmp_path):
    run = finished_run(tmp_path / "run", SMOKE)
    for override, message in [
        (
            "trainer.args.learning_rate=1e-3",
            r"^trainer\.args\.learning_rate: 0\.001 differs from the run's 0\.0001",
        ),
        ("model=tiny-olmoe", r"^model\.name_or_path: 'tiny-olmoe' differs from the run's 'tiny-qwen2-moe'"),
        (
            "sparcom.probe.per_category=20",
            r"^sparcom\.probe\.per_category: 20 differs from the run's 4",
        ),
        ("trainer.args.max_steps=40", r"^trainer\.args\.max_steps: 40 differs .*expected a larger value"),
    ]:
        with pytest.raises(ConfigError, match=message):
            checked_launch("train", [f"hydra.run.dir={run}", "resume=true", override])
    # Extending the run is taken, recorded, and kept by the next resume without being repeated.
    argv = checked_launch("train", [f"hydra.run.dir={run}", "resume=true", "trainer.args.max_steps=80"])
    cfg = compose("train", [o for o in argv if not o.startswith("hydra.")])
    changes = resume_changes(flat(as_plain(cfg)), run)
    assert changes == {"trainer.args.max_steps": (60, 80)}
    record_resume(run, run / "checkpoint-10", changes)
    assert run_config(run)["trainer.args.max_steps"] == 80
    assert launch_overrides(run)[-1] == "trainer.args.max_steps=80"
    argv = checked_launch("train", [f"hydra.run.dir={run}", "resume=true"])
    assert compose("train", [o for o in argv if not o.startswith("hydra.")]).trainer.args.max_steps == 80


def test_resume_without_a_run_folder_names_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match=r"^resume: true names no run; expected hydra\.run\.dir="):
        checked_launch("train", ["resume=true"])
    with pytest.raises(ConfigError, match=r"^resume: given with -m"):
        checked_launch("train", ["-m", f"hydra.run.dir={tmp_path}", "resume=true"])


def launch(overrides: list[str], cwd: Path) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if k != "SPARCOM_RUN_STAMP"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_ctrl_c_then_resume_continues_the_same_run(tmp_path):
    """The README's sequence: a run with its own overrides, Ctrl-C after a checkpoint, then
    ``hydra.run.dir=<run> resume=true`` alone."""
    run = tmp_path / "run"
    first = launch(
        [*SMOKE[:1], "trainer.args.max_steps=12", "trainer.args.save_steps=3", f"hydra.run.dir={run}"],
        tmp_path,
    )
    deadline = time.time() + 240
    while time.time() < deadline and 6 not in snapshot_series(run / "snapshots"):
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: training stopped at step ") and last.endswith(
        f"resume: python train.py hydra.run.dir={run} resume=true"
    ), last
    stopped = sorted(snapshot_series(run / "snapshots"))
    assert stopped[:3] == [0, 3, 6] and stopped[-1] < 12
    config, overrides = (run / "config.yaml").read_text(), (run / ".hydra" / "overrides.yaml").read_text()
    assert not list(run.glob("*.log"))  # no empty train.log beside the run
    card = (run / "README.md").read_text()  # the model card names the model the run started from as it is
    assert "the sparcom preset `tiny-qwen2-moe`" in card and "huggingface.co/tiny-qwen2-moe" not in card
    assert 'model="None"' not in card and f'"{run}/checkpoint-<step>"' in card

    second = launch([f"hydra.run.dir={run}", "resume=true"], tmp_path)
    out, err = second.communicate(timeout=400)
    assert second.returncode == 0, err[-3000:]
    assert (run / "config.yaml").read_text() == config and (
        run / ".hydra" / "overrides.yaml"
    ).read_text() == overrides
    assert (
        yaml.safe_load(config)["trainer"]["args"]["max_steps"] == 12
    )  # not the default 6 of the smoke preset
    assert sorted(snapshot_series(run / "snapshots")) == [0, 3, 6, 9, 12]
    steps = [
        json.loads(line)["step"] for line in (run / "snapshots" / "drift.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 3, 6, 9, 12]
    assert [
        row["checkpoint"] for row in map(json.loads, (run / "resumes.jsonl").read_text().splitlines())
    ] == ["checkpoint-6"]

    # W&B: one run (one id) in two offline files, steps before the kill in the first, after it in the second.
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2
    assert len({wandb_log.run(f).run_id for f in files}) == 1
    before, after = ([row.get("train/global_step") for row in wandb_log.history(f)] for f in files)
    assert max(s for s in before if s is not None) <= stopped[-1] + 1
    assert min(s for s in after if s is not None) > 6 and max(s for s in after if s is not None) == 12
    kinds = [record.WhichOneof("record_type") for record in wandb_log.records(files[0])]
    assert "preempting" in kinds
    exits = [r.exit.exit_code for r in wandb_log.records(files[0]) if r.WhichOneof("record_type") == "exit"]
    assert exits == [130]


def test_a_sweep_over_settings_that_need_no_retraining_warns(capsys):
    checked_launch("train", ["-m", "model=tiny-llama", "sparcom.epsilons=[0.3],[0.5]", "logger=disabled"])
    assert "varies only sparcom.epsilons, which need no retraining" in capsys.readouterr().err
    checked_launch(
        "train", ["-m", "model=tiny-llama", "trainer.args.learning_rate=1e-4,1e-3", "logger=disabled"]
    )
    assert "no retraining" not in capsys.readouterr().err


def test_each_process_of_a_multi_process_job_takes_its_share_of_the_cores():
    code = "import torch, train; train.share_cores(); print(torch.get_num_threads())"
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"LOCAL_WORLD_SIZE": "2"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=environment, timeout=120
    )
    assert int(done.stdout.split()[-1]) == max(1, (os.cpu_count() or 1) // 2), done.stderr
