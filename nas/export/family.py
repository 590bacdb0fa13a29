"""``nas export --family FILE``: one query network per device from one trained supernet.

The family file names device budgets (YAML)::

    devices:
      - name: phone          # a folder name: letters, digits, '-', '_'
        max_mflops: 3.5      # any of budgets.max_mflops / max_params_m / max_latency_ms / max_memory_mb
        max_latency_ms: 2.0
        latency: {runtime: onnxruntime, threads: 1}   # optional: the study's budgets.latency otherwise
      - name: camera
        max_mflops: 1.2
    trials: 30               # inherited-weight candidates per device (default 30)
    fine_tune_best: 1        # of which the best few are fine-tuned (default 1)

The study must be a one-shot study (``search.strategy: one_shot``). For every device a
search of its own runs on the study's trained supernet (never retrained: the device
studies read it from the study's run folder) with that device's budgets: a study
``<study>-<device>`` in the same storage and MLflow store, its candidates scored with
inherited weights, the best fine-tuned (the supernet trained within the study's
``supernet.max_mflops``, by default its ``budgets.max_mflops``: give the study the largest
device's budget). Its best trial is then exported and verified
like any trial (:func:`nas.export.export_trial`) into ``<out>/<device>/``. Every member
searches the same gallery index. ``FAMILY.md`` / ``FAMILY.json`` in ``<out>`` (and each
member's model card) list the family: budget, architecture, MFLOPs, latency, asymmetric
mAP and its ratio to the paragon; the table and the members' scores are logged to the
study's MLflow parent run. A device that no member of the space fits (even the smallest
exceeds its budgets), or for which no candidate fitting it was found, gets a row saying so
(``failed``) and the other devices go on; only a family with no member at all is an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

from nas.config import BudgetConfig, config_from_dict, config_to_dict
from nas.errors import BudgetError, ConfigError, NasError
from nas.export import export_trial
from nas.records import QUERY_MAP, QUERY_MAP_RATIO, QUERY_R1, StudyRecord
from nas.results import best_trial
from nas.search.driver import run_search
from nas.tracking import make_tracker
from nas.typed_config import build_dataclass

__all__ = ["export_family", "load_family", "Device"]

Log = Callable[[str], None]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class Device:
    """One entry of a family file: a name and its budgets."""

    def __init__(self, name: str, budgets: dict[str, Any]) -> None:
        self.name, self.budgets = name, budgets

    def describe(self) -> str:
        return ", ".join(f"{k} {v if isinstance(v, str) else format(v, 'g')}" for k, v in self.budgets.items() if k.startswith("max_") and v is not None)


def load_family(path: str | Path) -> tuple[list[Device], int, int]:
    """The devices of family file ``path``, the trials per device and how many are fine-tuned; a clear :class:`ConfigError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Family file {path} does not exist; write a YAML file with a 'devices' list (see 'nas export --help' and the README).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Family file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list) or not data["devices"]:
        raise ConfigError(f"Family file {path} must hold a mapping with a non-empty 'devices' list, e.g. devices: [{{name: phone, max_mflops: 3.5}}].")
    unknown = set(data) - {"devices", "trials", "fine_tune_best"}
    if unknown:
        raise ConfigError(f"Family file {path}: unknown key(s) {', '.join(sorted(unknown))}; valid keys: devices, trials, fine_tune_best.")
    trials, best = data.get("trials", 30), data.get("fine_tune_best", 1)
    if not isinstance(trials, int) or trials < 1 or not isinstance(best, int) or best < 1:
        raise ConfigError(f"Family file {path}: 'trials' and 'fine_tune_best' must be integers >= 1, but got {trials!r} and {best!r}.")
    devices, seen = [], set()
    for i, entry in enumerate(data["devices"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not _NAME.match(entry["name"]):
            raise ConfigError(f"Family file {path}: device {i} needs a 'name' of letters, digits, '-' and '_' (a folder name), but got {entry!r}.")
        name = entry["name"]
        if name in seen:
            raise ConfigError(f"Family file {path}: device name {name!r} appears twice.")
        seen.add(name)
        budgets = {k: v for k, v in entry.items() if k != "name"}
        if not any(budgets.get(k) is not None for k in ("max_mflops", "max_params_m", "max_latency_ms", "max_memory_mb")):
            raise ConfigError(f"Family file {path}: device {name!r} sets no budget; give at least one of max_mflops, max_params_m, max_latency_ms, max_memory_mb.")
        try:
            build_dataclass(BudgetConfig, budgets, prefix=f"devices[{name}]")
        except ConfigError as exc:
            raise ConfigError(f"Family file {path}, device {name!r}: {exc}") from None
        devices.append(Device(name, budgets))
    return devices, trials, best


def _device_config(base: dict[str, Any], run_dir: Path, storage_url: str, tracking_uri: str | None, study_name: str, device: Device,
                   trials: int, fine_tune_best: int) -> dict[str, Any]:
    """The config of ``device``'s search: the study's, with the device's budgets, in ``<run dir>/family/<device>``,
    reading the gallery model, its embeddings and the supernet from the study's run folder."""
    data = json.loads(json.dumps(base))
    data["out"] = str(run_dir / "family" / device.name)
    data["cache"] = str(Path(base.get("cache") or run_dir))
    gallery = data["gallery"]
    if not gallery.get("checkpoint") and not gallery.get("weights") and not gallery.get("pretrained"):
        gallery["checkpoint"] = str(run_dir / "gallery" / "gallery.safetensors")  # the gallery model the study trained
    budgets = {**{k: None for k in ("max_mflops", "max_params_m", "max_latency_ms", "max_memory_mb")}, **device.budgets}
    budgets["latency"] = {**base["budgets"]["latency"], **device.budgets.get("latency", {})}
    if data["supernet"].get("max_mflops", "budget") == "budget":  # the study's supernet, whatever the device's budgets
        data["supernet"]["max_mflops"] = base["budgets"].get("max_mflops")
    data["budgets"] = budgets
    warm_start = "largest" if data["search"].get("warm_start") == "largest" else None  # the space's own; others name the study's baselines
    data["search"].update(study_name=f"{study_name}-{device.name}", storage=storage_url, trials=trials, warm_start=warm_start)
    data["supernet"]["fine_tune_best"] = fine_tune_best
    if data["tracking"]["enabled"]:
        data["tracking"]["uri"] = tracking_uri
    return data


def export_family(
    study: optuna.Study, storage_url: str, family_file: str | Path, out: str | Path, formats: str | Sequence[str] | None = None,
    log: Log = print, tracking_uri: str | None = None,
) -> list[dict[str, Any]]:
    """Search, fine-tune, export and verify one query network per device of ``family_file`` (see the module docstring); the family's rows."""
    devices, trials, fine_tune_best = load_family(family_file)
    record = StudyRecord.load(study)
    if record.config is None:
        raise NasError(f"Study {study.study_name!r} records no config; run 'nas search' on it first.")
    run_dir = Path(record.out_dir or record.config.get("out") or Path("runs") / study.study_name)
    config = config_from_dict({**record.config, "out": str(run_dir)})
    if config.search.strategy != "one_shot":
        raise NasError(
            f"--family needs a one-shot study (search.strategy: one_shot), but study {study.study_name!r} used {config.search.strategy!r}: "
            f"its candidates share no supernet. Run 'nas search' with search.strategy: one_shot first."
        )
    uri = tracking_uri or (config.tracking_uri if config.tracking.enabled else None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paragon = record.paragon_query
    gallery_mflops = record.gallery_budgets.get("mflops", float("nan"))
    rows: list[dict[str, Any]] = []
    for device in devices:
        log(f"== Device {device.name} ({device.describe()}): {trials} candidates scored by supernet.score {config.supernet.score}, "
            f"the best {fine_tune_best} fine-tuned")
        data = _device_config(config_to_dict(config), run_dir, storage_url, uri, study.study_name, device, trials, fine_tune_best)
        try:
            # the device study's total: a second export reuses its trials rather than adding more
            device_study = run_search(config_from_dict(data), log=lambda text, _n=device.name: log(f"[{_n}] {text}"), total_trials=trials)
        except BudgetError as exc:  # even the space's smallest member exceeds the device's budgets
            rows.append({"device": device.name, "budget": device.describe(), "failed": str(exc)})
            log(f"Device {device.name!r}: no member of the space fits. {exc}")
            continue
        best = best_trial(device_study)
        if best is None:
            reason = f"none of its {trials} candidates fitting {device.describe()} was fine-tuned; loosen its budgets or raise 'trials'."
            rows.append({"device": device.name, "budget": device.describe(), "study": device_study.study_name, "failed": reason})
            log(f"Device {device.name!r}: {reason}")
            continue
        verification = export_trial(device_study, "best", out / device.name, formats=formats, log=log, tracking_uri=tracking_uri)
        m, b = best.metrics, best.budgets
        rows.append({
            "device": device.name, "budget": device.describe(), "study": device_study.study_name, "trial": best.number, "arch": best.arch,
            "mflops": b["mflops"], "params_m": b["params_m"], "latency_ms": b["latency_ms"], "gallery_share": b["mflops"] / gallery_mflops,
            "query_mAP": m[QUERY_MAP], "query_R@1": m.get(QUERY_R1), "query_mAP_ratio": m[QUERY_MAP_RATIO],
            "inherited_val_mAP": m.get("inherited_val_mAP"), "val_mAP": m.get("val_mAP"), "verified": verification["passed"],
            # which start its fine-tuning kept, and each start's scores (supernet.fine_tune_from)
            **{k: v for k, v in m.items() if k.startswith(("from_", "start_")) or k in ("fine_tuned_from_gallery", "gallery_start_kept_bn")},
        })
    members = [r for r in rows if "failed" not in r]
    if not members:
        raise NasError("No device of the family got a member: " + " ".join(f"{r['device']}: {r['failed']}" for r in rows))
    table = family_table(rows, paragon, config)
    (out / "FAMILY.md").write_text(table)
    (out / "FAMILY.json").write_text(json.dumps({"study": study.study_name, "paragon": paragon, "members": rows}, indent=2))
    for row in members:
        card = out / row["device"] / "MODEL_CARD.md"
        card.write_text(card.read_text() + "\n" + table)
    log(table)
    if config.tracking.enabled and record.mlflow_parent_run_id:
        tracker = make_tracker(config_from_dict({**config_to_dict(config), "tracking": {**config_to_dict(config)["tracking"], "uri": uri}}), log)
        tracker.log_text(record.mlflow_parent_run_id, table, "FAMILY.md")
        tracker.log(record.mlflow_parent_run_id, metrics={
            f"family_{r['device']}_{k}": r[k] for r in members for k in ("query_mAP", "query_mAP_ratio", "mflops", "latency_ms")
        })
        tracker.flush()
    return rows


def family_table(rows: list[dict[str, Any]], paragon: dict[str, float], config: Any) -> str:
    """The family as a Markdown table: one row per device (a device without a member says why)."""
    lat = config.budgets.latency
    lines = [
        "## The family: one query network per device, all searching the same gallery index",
        "",
        f"Paragon (gallery model on both sides): query mAP {paragon.get('mAP', float('nan')):.4f}. MFLOPs: fvcore multiply-accumulates, "
        f"batch 1; latency: median ms on each device's runtime ({lat.runtime}, {lat.threads} thread(s) unless the family file says otherwise).",
        "",
        "| device | budget | MFLOPs | share of gallery | params M | latency ms | query mAP | ratio to paragon | R@1 | fine-tuned from | architecture |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['device']} | {r['budget']} | no member: {r['failed'].replace('|', '/')} | | | | | | | | |")
            continue
        r1 = "-" if r["query_R@1"] is None else f"{r['query_R@1']:.4f}"
        start = "-" if "fine_tuned_from_gallery" not in r else ("the gallery's weights" if r["fine_tuned_from_gallery"] else "the supernet's weights")
        lines.append(
            f"| {r['device']} | {r['budget']} | {r['mflops']:.3f} | 1/{1 / r['gallery_share']:.1f} | {r['params_m']:.3f} | {r['latency_ms']:.2f} | "
            f"{r['query_mAP']:.4f} | {r['query_mAP_ratio']:.3f} | {r1} | {start} | `{r['arch']}` |"
        )
    return "\n".join(lines) + "\n"
