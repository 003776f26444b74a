"""Turn snapshots into the paper's tables and figures, a causal check, and one HTML report.

python analyze.py run=outputs/<run>                       # a train.py run: base = step 0, tuned = last
python analyze.py base=tiny-olmoe tuned=path/to/finetuned # record both (or give .safetensors snapshots)
python analyze.py mode=ablate run=outputs/<run>           # zero each category's ISNs, measure losses
python analyze.py experiment=paper                        # the paper's real-model comparisons (GPU)
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sparcom.config_check import check_analyze, exit_on_bad_input

ROOT = Path(__file__).resolve().parent


def analysis_dir(run: str | None, out: str | None, stamp: str) -> str:
    """Where results go: ``out``, else ``<run>/analysis``, else ``analysis/<launch time>``."""
    if out not in (None, "None", "null"):
        return str(out)
    if run not in (None, "None", "null"):
        return str(Path(run) / "analysis")
    return f"analysis/{stamp}"


def model_spec(spec: str) -> dict:
    """A conf/model preset by name, or a path / hub id as it is."""
    preset = ROOT / "conf" / "model" / f"{spec}.yaml"
    if preset.is_file():
        return yaml.safe_load(preset.read_text())
    return {"name_or_path": spec, "dtype": None, "chat_template_from": None}


def snapshot_of(spec: str, cfg: DictConfig, records: list[dict]):
    """A snapshot from a file, or recorded now from a model; returns (snapshot, model spec or None)."""
    from sparcom.probe import record
    from sparcom.report_builder import load_for_analysis
    from sparcom.snapshot import Snapshot
    from sparcom.training import probe_set

    if str(spec).endswith(".safetensors"):
        return Snapshot.load(spec), None
    loaded = model_spec(spec)
    model, tokenizer = load_for_analysis(loaded, cfg.dtype)
    probe = probe_set(records, cfg.probe.per_category, cfg.probe.seed)
    snapshot = record(model, tokenizer, probe, token_scope=cfg.token_scope, batch_size=cfg.probe.batch_size,
                      per_instruction=cfg.probe.per_instruction)  # fmt: skip
    del model
    return snapshot, loaded


@hydra.main(config_path="conf", config_name="analyze", version_base="1.3")
@exit_on_bad_input
def main(cfg: DictConfig) -> None:
    from sparcom.data import load_records
    from sparcom.report_builder import ablation_report, comparison_report, run_inputs

    check_analyze(cfg)
    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(cfg.data.path)
    if cfg.run:
        inputs = run_inputs(Path(cfg.run))
        if cfg.mode == "ablate":
            ablation_report(cfg, out, records, inputs["tuned"], inputs["tuned_model"])
        else:
            comparison_report(
                cfg, out, records, inputs["base"], inputs["tuned"], inputs["tokenizer"], inputs["series"]
            )
        return
    pairs = (
        OmegaConf.to_container(cfg.pairs)
        if cfg.pairs
        else [{"name": "", "base": cfg.base, "tuned": cfg.tuned}]
    )
    for pair in pairs:
        if not pair["base"] or (cfg.mode == "compare" and not pair["tuned"]):
            raise ValueError(
                "give run=<run folder>, or base=<...> and tuned=<...> (snapshots, presets, paths or hub ids)"
            )
        target = out / pair["name"] if pair["name"] else out
        target.mkdir(parents=True, exist_ok=True)
        if cfg.mode == "ablate":
            spec = pair["tuned"] or pair["base"]
            snapshot, loaded = snapshot_of(spec, cfg, records)
            ablation_report(cfg, target, records, snapshot, loaded)
            continue
        base, base_model = snapshot_of(pair["base"], cfg, records)
        tuned, tuned_model = snapshot_of(pair["tuned"], cfg, records)
        tokenizer_spec = tuned_model or base_model
        comparison_report(cfg, target, records, base, tuned, tokenizer_spec, None)
    print(json.dumps({"report": str(out / "report.html") if len(pairs) == 1 else str(out)}))


if __name__ == "__main__":
    from omegaconf import OmegaConf as _OmegaConf

    _OmegaConf.register_new_resolver("analysis_dir", analysis_dir, replace=True)
    main()
