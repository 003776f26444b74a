"""train.py end to end: real TRL SFT, real W&B offline run files, real DeepSpeed ZeRO-3 on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparcom
from sparcom.data import CATEGORIES, load_records
from sparcom.drift import drift_metrics
from sparcom.models import load_model
from sparcom.snapshot import Snapshot, snapshot_series
from sparcom.training import probe_set
from sparcom.wandb_log import history, records, run_file

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["experiment=smoke", "sparcom.epsilons=[0.3,0.5]"]


def train(
    tmp_path: Path, *overrides: str, processes: int = 1, timeout: int = 400
) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "WANDB_MODE": "", "PYTHONUNBUFFERED": "1"}
    env.pop("SPARCOM_RUN_STAMP", None)
    done = subprocess.run([*launcher, str(ROOT / "train.py"), *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def drift_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "snapshots" / "drift.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_run_logs_drift_next_to_the_loss(tmp_path):
    run = tmp_path / "run"
    train(tmp_path, *SMOKE, f"hydra.run.dir={run}")
    rows = history(run_file(run / "wandb"))
    losses = {r["train/global_step"] for r in rows if "train/loss" in r}
    assert losses == {1, 2, 3, 4, 5, 6}
    drift = {r["train/global_step"]: r for r in rows if "sparcom/isn_jaccard/base/eps=0.5/math" in r}
    assert set(drift) == {0, 3, 6}  # step 0 and both checkpoints, on the loss's step axis
    for step, row in drift.items():
        for category in CATEGORIES:
            for epsilon in ("0.3", "0.5"):
                assert f"sparcom/isn_jaccard/base/eps={epsilon}/{category}" in row
            assert f"sparcom/ise_pearson/base/{category}" in row
        if step:
            assert f"sparcom/isn_jaccard/prev/eps=0.5/{category}" in row
    assert all(drift[0][f"sparcom/isn_jaccard/base/eps=0.5/{c}"] == 1.0 for c in CATEGORIES)
    assert any(drift[6][f"sparcom/isn_jaccard/base/eps=0.5/{c}"] < 1.0 for c in CATEGORIES)  # it moved
    # The snapshots on disk reload to exactly what was logged.
    series = snapshot_series(run / "snapshots")
    assert sorted(series) == [0, 3, 6] and (run / "checkpoint-3").is_dir() and (run / "checkpoint-6").is_dir()
    base = Snapshot.load(series[0])
    for step in (3, 6):
        recomputed = drift_metrics(base, Snapshot.load(series[step]), [0.3, 0.5], "threshold", "base")
        for key, value in recomputed.items():
            assert drift[step][key] == pytest.approx(value, abs=1e-12), key
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_resumed_run_continues_the_drift_series(tmp_path):
    run = tmp_path / "run"
    train(tmp_path, *SMOKE, f"hydra.run.dir={run}", "trainer.args.max_steps=3")
    base_file = snapshot_series(run / "snapshots")[0]
    base_bytes = base_file.read_bytes()
    train(tmp_path, *SMOKE, f"hydra.run.dir={run}", "trainer.args.max_steps=6", "resume=true")
    assert [row["step"] for row in drift_rows(run)] == [0, 3, 6]
    assert base_file.read_bytes() == base_bytes  # the base came from disk, not from resumed weights
    series = snapshot_series(run / "snapshots")
    logged = drift_rows(run)[-1]
    expected = drift_metrics(
        Snapshot.load(series[0]), Snapshot.load(series[6]), [0.3, 0.5], "threshold", "base"
    )
    assert all(logged[k] == pytest.approx(v, abs=1e-12) for k, v in expected.items())
    expected = drift_metrics(
        Snapshot.load(series[3]), Snapshot.load(series[6]), [0.3, 0.5], "threshold", "prev"
    )
    assert all(logged[k] == pytest.approx(v, abs=1e-12) for k, v in expected.items())


@pytest.mark.slow
def test_zero3_two_ranks_record_what_one_process_records(tmp_path):
    run = tmp_path / "run"
    train(tmp_path, *SMOKE, f"hydra.run.dir={run}", "deepspeed=zero3", "logger=disabled", processes=2)
    series = snapshot_series(run / "snapshots")
    assert sorted(series) == [0, 3, 6]
    model, tokenizer = load_model(str(run / "checkpoint-6"))
    probe = probe_set(load_records(), per_category=4, seed=0)
    torch.set_num_threads(1)  # as each torchrun rank ran
    single = sparcom.record(model, tokenizer, probe, progress=False)
    distributed = Snapshot.load(series[6])
    assert distributed.tokens == single.tokens
    for site in single.category_counts:
        assert torch.equal(distributed.instruction_counts[site], single.instruction_counts[site]), site


@pytest.mark.slow
def test_learning_rate_sweep_runs_grouped(tmp_path):
    train(
        tmp_path,
        "-m",
        *SMOKE,
        "trainer.args.max_steps=3",
        "trainer.args.learning_rate=1e-4,3e-4",
        timeout=600,
    )
    sweeps = list((tmp_path / "multirun").iterdir())
    assert len(sweeps) == 1
    groups = set()
    for job in ("0", "1"):
        for record in records(run_file(sweeps[0] / job / "wandb")):
            if record.WhichOneof("record_type") == "run":
                groups.add(record.run.run_group)
        assert snapshot_series(sweeps[0] / job / "snapshots")
    assert groups == {sweeps[0].name}


@pytest.mark.slow
def test_lora_run_records_the_adapted_model(tmp_path):
    run = tmp_path / "run"
    train(tmp_path, *SMOKE, "trainer=lora", "logger=disabled", f"hydra.run.dir={run}")
    rows = drift_rows(run)
    assert [row["step"] for row in rows] == [0, 3, 6]
    assert rows[-1]["sparcom/isn_jaccard/base/eps=0.5/mean"] < 1.0  # the adapters moved the ISNs
    assert (run / "checkpoint-6" / "adapter_config.json").is_file()
