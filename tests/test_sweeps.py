"""The four ways to sweep, run for real on the tiny MoE: Hydra's basic multirun (test_train.py),
Optuna through hydra-optuna-sweeper, jobs in separate processes through submitit's local launcher
(the SLURM launcher's machinery on one machine), and a W&B Sweeps agent's command line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparcom.cli import compose
from sparcom.train.drift import read_drift, run_result

from helpers import wandb_log

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["experiment=smoke", "trainer.args.max_steps=2", "trainer.args.save_steps=2"]


def launched(arguments: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("SPARCOM_RUN_STAMP", "SPARCOM_SWEPT")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *arguments],
        cwd=cwd,
        env=environment | env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def jobs(cwd: Path) -> list[Path]:
    (sweep,) = (cwd / "multirun").iterdir()
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def test_the_preset_configs_compose():
    optuna = compose("train", ["hydra/sweeper=optuna_lr"])
    assert optuna.objective == "eval/loss/mean"
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        hydra = hydra_compose(
            "train", ["hydra/launcher=slurm", "hydra/sweeper=optuna_lr"], return_hydra_config=True
        ).hydra
    assert hydra.sweeper.params["trainer.args.learning_rate"] == "tag(log, interval(1e-5, 1e-3))"
    assert hydra.sweeper.direction == "minimize" and hydra.launcher.gpus_per_node == 1
    assert "SlurmLauncher" in hydra.launcher._target_ and hydra.launcher.timeout_min == 240


@pytest.mark.slow
def test_optuna_trials_optimise_the_objective_the_runs_return(tmp_path):
    done = launched(
        ["-m", "hydra/sweeper=optuna_lr", "hydra.sweeper.n_trials=2", *QUICK, "logger=disabled"], tmp_path
    )
    folders = jobs(tmp_path)
    assert [p.name for p in folders] == ["0", "1"]
    losses = [run_result(p).objective("eval/loss/mean") for p in folders]
    results = yaml.safe_load(
        next((tmp_path / "multirun").iterdir()).joinpath("optimization_results.yaml").read_text()
    )
    assert results["best_value"] == pytest.approx(min(losses))
    rates = [
        yaml.safe_load((p / "config.yaml").read_text())["trainer"]["args"]["learning_rate"] for p in folders
    ]
    assert results["best_params"]["trainer.args.learning_rate"] == rates[losses.index(min(losses))]
    assert min(rates) >= 1e-5 and max(rates) <= 1e-3 and rates[0] != rates[1]
    assert "Best value" in done.stdout + done.stderr


@pytest.mark.slow
def test_a_submitit_sweep_runs_each_job_in_its_own_process_folder_and_wandb_run(tmp_path):
    launched(
        [
            "-m",
            "hydra/launcher=submitit_local",
            *QUICK,
            "trainer.args.learning_rate=1e-4,2e-4",
            "logger=offline",
        ],
        tmp_path,
    )
    folders = jobs(tmp_path)
    assert [p.name for p in folders] == ["0", "1"]
    runs = [wandb_log.run(wandb_log.run_file(p / "wandb")) for p in folders]
    assert len({r.run_id for r in runs}) == 2 and len({r.run_group for r in runs}) == 1
    assert [r.display_name for r in runs] == ["learning_rate=0.0001", "learning_rate=0.0002"]
    assert runs[0].run_group == folders[0].parent.name
    for folder, rate in zip(folders, (1e-4, 2e-4), strict=True):
        assert (
            yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["args"]["learning_rate"] == rate
        )
        assert run_result(folder).step == 2
    logs = list(folders[0].parent.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2 and len({log.parent.name for log in logs}) == 2  # two submitit jobs, two processes


@pytest.mark.slow
def test_the_command_a_wandb_agent_builds_from_the_sweep_file_runs_the_trial(tmp_path, monkeypatch):
    """The agent's own code (wandb.wandb_agent.Agent) expands the sweep file's command for a trial
    and starts it; offline, the controller that would send the trial is played by the test."""
    from wandb.wandb_agent import Agent

    sweep = yaml.safe_load((ROOT / "conf" / "sweeps" / "wandb_lr.yaml").read_text())
    assert sweep["metric"] == {"name": "eval/loss/mean", "goal": "minimize"}
    (tmp_path / "train.py").symlink_to(ROOT / "train.py")  # the agent runs `python train.py` where it stands
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.delenv("SPARCOM_RUN_STAMP", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    agent = Agent(api=None, queue=None, sweep_id="sweep123")
    agent._sweep_command = sweep["command"]
    trial = {"trainer.args.learning_rate": {"value": 0.00042}} | {
        key: {"value": value}
        for key, value in (o.split("=") for o in QUICK)  # constants a sweep file may add
    }
    agent._command_run({"args": trial, "program": sweep["program"], "run_id": "trial0001"})
    assert agent._run_processes["trial0001"]._popen.wait(timeout=900) == 0
    (folder,) = (tmp_path / "outputs").iterdir()
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["args"]["learning_rate"] == 0.00042
    wandb_file = wandb_log.run_file(folder / "wandb")
    assert wandb_log.run(wandb_file).run_id == "trial0001"  # the agent's run: it joins the sweep
    assert wandb_log.config(wandb_file)["trainer"]["args"]["learning_rate"] == 0.00042
    losses = [sum(p.held_out_loss.values()) / 6 for p in read_drift(folder / "snapshots" / "drift.jsonl")]
    assert wandb_log.summary(wandb_file)[sweep["metric"]["name"]] == pytest.approx(
        min(losses)
    )  # what it ranks by


def test_a_sweep_over_an_unknown_key_is_refused_on_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer.args.learning_rat=1e-4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "SPARCOM_RUN_STAMP"},
    )
    assert done.returncode == 2 and done.stderr.startswith("error: trainer.args.learning_rat: unknown key")
    assert list(tmp_path.iterdir()) == []


def analyzed(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "analyze.py"), *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if k != "SPARCOM_RUN_STAMP"},
    )


@pytest.mark.slow
def test_one_view_across_a_sweep(tmp_path):
    launched(["-m", *QUICK, "trainer.args.learning_rate=1e-4,1e-3", "logger=disabled"], tmp_path)
    (sweep,) = (tmp_path / "multirun").iterdir()
    done = analyzed([f"sweep={sweep}", "stats.resamples=20"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = sweep / "analysis" / "sweep"
    rows = list(csv.DictReader((out / "sweep.csv").read_text().splitlines()))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert [float(r["trainer.args.learning_rate"]) for r in rows] == [1e-4, 1e-3]
    for row, job in zip(rows, jobs(tmp_path), strict=True):
        result = run_result(job)
        assert float(row["eval/loss/mean"]) == pytest.approx(result.objective("eval/loss/mean"))
        for epsilon in ("0.3", "0.5", "0.7"):  # every epsilon from the stored counts
            logged = result.final.isn_jaccard["base"][float(epsilon)]["math"]
            assert float(row[f"isn_jaccard_eps{epsilon}_math"]) == pytest.approx(logged)
            low, high = json.loads(row[f"isn_jaccard_eps{epsilon}_math_ci95"])
            assert low <= logged <= high
        change = result.final.held_out_loss["code"] - result.start.held_out_loss["code"]
        assert float(row["held_out_loss_change_code"]) == pytest.approx(change)
    for figure in ("drift.png", "held_out_loss.png"):
        assert (out / "figures" / figure).stat().st_size > 10_000
    index = (sweep / "analysis" / "index.html").read_text()
    assert 'href="sweep/report.html"' in index and "sweep: 2 jobs varying trainer.args.learning_rate" in index


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "holds no finished train.py job"),
        ("models", "the jobs fine-tuned different models (tiny-llama, tiny-qwen2-moe)"),
    ],
)
def test_a_sweep_that_cannot_be_viewed_is_refused_on_one_line(tmp_path, case, message):
    sweep = tmp_path / "multirun" / "x"
    for job, model in (("0", "tiny-qwen2-moe"), ("1", "tiny-llama")):
        folder = sweep / job
        (folder / "snapshots").mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": model}}))
        if case == "models":
            (folder / "snapshots" / "drift.jsonl").write_text("")
    before = sorted(p for p in tmp_path.rglob("*"))
    done = analyzed([f"sweep={sweep}"], tmp_path)
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written
