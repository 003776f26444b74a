"""Turn snapshots into the paper's tables and figures, a causal check, and one HTML report.

python analyze.py run=outputs/<run>                       # a train.py run: base = step 0, tuned = last
python analyze.py base=tiny-olmoe tuned=path/to/finetuned # record both (or give .safetensors snapshots)
python analyze.py mode=ablate run=outputs/<run>           # zero each category's ISNs, measure losses
python analyze.py experiment=paper                        # the paper's real-model comparisons (GPU)

In Python: ``analyze(cfg, out)`` with ``cfg`` a ``sparcom.config.AnalyzeConfig``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

from sparcom import cli
from sparcom.config import AnalyzeConfig, PairConfig, to_object
from sparcom.config_check import check

ROOT = Path(__file__).resolve().parent


def model_spec(spec: str) -> dict:
    """A conf/model preset by name, or a path / hub id as it is."""
    preset = ROOT / "conf" / "model" / f"{spec}.yaml"
    if preset.is_file():
        return yaml.safe_load(preset.read_text())
    return {"name_or_path": spec, "dtype": None, "chat_template_from": None}


def snapshot_of(spec: str, cfg: AnalyzeConfig, records: list[dict]):
    """A snapshot from a file, or recorded now from a model; returns (snapshot, model spec or None)."""
    from sparcom.probe import record
    from sparcom.report_builder import load_for_analysis
    from sparcom.snapshot import Snapshot
    from sparcom.training import probe_set

    if spec.endswith(".safetensors"):
        return Snapshot.load(spec), None
    loaded = model_spec(spec)
    model, tokenizer = load_for_analysis(loaded, cfg.dtype)
    probe = cfg.sparcom.probe
    snapshot = record(
        model,
        tokenizer,
        probe_set(records, probe.per_category, probe.seed),
        token_scope=cfg.sparcom.token_scope,
        batch_size=probe.batch_size,
        per_instruction=probe.per_instruction,
    )
    del model
    return snapshot, loaded


def analyze(cfg: AnalyzeConfig, out: Path) -> list[Path]:
    """Write the reports of ``cfg.mode`` under ``out``; returns the HTML report of each comparison."""
    from sparcom.data import load_records
    from sparcom.report_builder import ablation_report, comparison_report, run_inputs

    check(cfg)  # what to_object checked, for a config built in Python
    records = load_records(cfg.data.path)
    if cfg.run:
        inputs = run_inputs(Path(cfg.run))
        out.mkdir(parents=True, exist_ok=True)
        if cfg.mode == "ablate":
            return [ablation_report(cfg, out, records, inputs["tuned"], inputs["tuned_model"])]
        return [
            comparison_report(
                cfg, out, records, inputs["base"], inputs["tuned"], inputs["tokenizer"], inputs["series"]
            )
        ]
    reports = []
    for pair in cfg.pairs or [PairConfig(name="", base=cfg.base, tuned=cfg.tuned)]:
        target = out / pair.name if pair.name else out
        target.mkdir(parents=True, exist_ok=True)
        if cfg.mode == "ablate":
            snapshot, loaded = snapshot_of(pair.tuned or pair.base, cfg, records)
            reports.append(ablation_report(cfg, target, records, snapshot, loaded))
            continue
        base, base_model = snapshot_of(pair.base, cfg, records)
        tuned, tuned_model = snapshot_of(pair.tuned, cfg, records)
        reports.append(comparison_report(cfg, target, records, base, tuned, tuned_model or base_model, None))
    return reports


@hydra.main(config_path="conf", config_name="analyze", version_base="1.3")
@cli.exits_on_bad_input
def main(cfg: DictConfig) -> None:
    for report in analyze(to_object(cfg), cli.run_dir()):
        print(f"report: {report}")


if __name__ == "__main__":
    cli.prepare("analyze")  # the config is checked before Hydra creates the output folder
    main()
