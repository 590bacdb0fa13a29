"""The ``nas`` command line.

``nas search CONFIG``, ``nas worker CONFIG``, ``nas gallery train CONFIG``, ``nas export``,
``nas results``, ``nas embed``, ``nas query``, ``nas ui``, ``nas dashboard``, ``nas spaces`` and ``nas space show``. Errors that are the user's to fix print one paragraph and exit with 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from nas.secrets import mask_process_output, mask_text
from nas.cli_args import add_dashboard_parser, add_query_parser, add_ui_parser

# The commands import what they need when they run, so that `nas --help` and a config
# error answer at once instead of after importing torch, Optuna and MLflow.

__all__ = ["main", "build_parser"]


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in ``[low, high]`` (a bad value: argparse's usage error, exit status 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, but got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'between {low} and {high}' if high else f'>= {low}'}, but got {value}")
        return value

    return parse


def _limit(text: str) -> float | str:
    """A budget limit: a number, or a fraction of the gallery model's figure (``1/10``, ``10%``), checked with the config."""
    try:
        return float(text)
    except ValueError:
        return text


def _add_config_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML file, e.g. experiments/quickstart.yaml")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (they are shown only on a terminal anyway)")
    parser.add_argument("--out", help="output folder (study, caches, weights); default runs/<study name>")
    parser.add_argument("--study-name", help="Optuna study name (search.study_name)")
    parser.add_argument("--storage", help="Optuna storage URL, or env:NAME to read it from that variable; default sqlite:///<out>/optuna.db")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI, or env:NAME to read it from that variable; default sqlite:///<out>/mlflow.db")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nas", description="Search query networks for asymmetric image retrieval.")
    sub = parser.add_subparsers(dest="command", required=True)

    search = sub.add_parser("search", help="run or resume a budgeted architecture search")
    _add_config_overrides(search)
    search.add_argument("--trials", type=int, help="number of trials this run adds to the study")
    search.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    search.add_argument("--max-mflops", type=_limit, help="budget (or a fraction of the gallery model's, 1/10): millions of multiply-accumulates (fvcore, batch 1)")
    search.add_argument("--max-latency-ms", type=_limit, help="budget (or a fraction of the gallery model's, 1/10): median latency in ms on budgets.latency.runtime")
    search.add_argument("--max-params-m", type=_limit, help="budget (or a fraction of the gallery model's, 1/10): millions of parameters")
    search.add_argument("--max-memory-mb", type=_limit, help="budget (or a fraction of the gallery model's, 1/10): MiB peak memory of one forward pass (weights + activations)")
    search.add_argument("--seed", type=int, help="sampler seed (search.seed)")
    search.add_argument("--sampler", help="search.sampler, a registered Optuna sampler (default tpe)")
    search.add_argument("--objectives", help="comma-separated search.objectives, e.g. mAP,mflops (default mAP)")
    search.add_argument("--threads", type=int, help="torch threads for training (search.threads; default: the cores other jobs leave free)")
    search.add_argument("--workers", type=_int_in(1), default=1, help="run N worker processes on this machine (default 1)")

    worker = sub.add_parser("worker", help="join a shared study and run trials until it holds its trial budget")
    _add_config_overrides(worker)
    worker.add_argument("--trials", type=_int_in(0), required=True, help="the study's total trial budget (all workers together)")
    worker.add_argument("--request", help="count --trials toward this request id instead of the study's total (set by nas search --workers)")
    worker.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    worker.add_argument("--threads", type=int, help="torch threads for training")

    gallery = sub.add_parser("gallery", help="gallery model commands")
    gsub = gallery.add_subparsers(dest="gallery_command", required=True)
    gtrain = gsub.add_parser("train", help="train the gallery model of CONFIG on its train split")
    gtrain.add_argument("config", help="experiment YAML file")
    gtrain.add_argument("--out", help="output folder; the model goes to <out>/gallery/gallery.safetensors")
    gtrain.add_argument("--force", action="store_true", help="train again even if the checkpoint exists")
    gtrain.add_argument("--quiet", action="store_true", help="no progress bars")

    supernet = sub.add_parser("supernet", help="one-shot strategy commands")
    supsub = supernet.add_subparsers(dest="supernet_command", required=True)
    strain = supsub.add_parser("train", help="train (or resume) the supernet of CONFIG; 'nas search' with search.strategy one_shot reuses it")
    _add_config_overrides(strain)
    strain.add_argument("--threads", type=int, help="torch threads for training")
    for command in (search, worker, strain):  # e.g. one GPU per worker process on a multi-GPU machine
        command.add_argument("--device", help="train.device: auto, cpu, cuda or cuda:N")

    for name, help_text in (
        ("export", "export a trial's query network (arch, weights, TorchScript, ONNX, card)"),
        ("results", "print a study's results table"),
        ("report", "write a study's report (top trials, Pareto front and plots, importances) and log it to MLflow"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--study-name", required=True, help="the study to read")
        cmd.add_argument("--storage", help="Optuna storage URL (env:NAME: from that variable); default sqlite:///<run dir>/optuna.db")
        cmd.add_argument("--run-dir", help="the search's output folder; default runs/<study name>")
        if name in ("export", "report"):
            cmd.add_argument("--tracking-uri", help="MLflow tracking URI to log to (env:NAME allowed); default the study's recorded one")
        if name == "report":
            cmd.add_argument("--top", type=_int_in(1), default=10, help="how many of the best trials to list (default 10)")
            cmd.add_argument("--out", help="folder for the report files; default <run dir>/report")
        if name == "export":
            cmd.add_argument("--trial", default="best", help="'best' (default), 'pareto:K' (see 'nas results') or a trial number")
            cmd.add_argument("--family", metavar="FILE", help="a one-shot study: export one query network per device budget of this YAML file (see README)")
            cmd.add_argument("--out", required=True, help="folder to write the export to")
            cmd.add_argument("--format", help="comma-separated registered export formats (default: all; see nas.export.EXPORTERS)")

    embed_cmd = sub.add_parser("embed", help="embed a folder of images with an exported query network")
    embed_cmd.add_argument("export_dir", help="folder written by 'nas export'")
    embed_cmd.add_argument("images", help="folder of images (searched recursively)")
    embed_cmd.add_argument("--out", required=True, help="FILE.npy for the embeddings; the image ids go to FILE.ids.txt")

    add_ui_parser(sub)
    add_dashboard_parser(sub)
    add_query_parser(sub)

    sub.add_parser("spaces", help="list the registered search spaces and their options")
    space = sub.add_parser("space", help="search-space commands")
    ssub = space.add_subparsers(dest="space_command", required=True)
    sshow = ssub.add_parser("show", help="print a space's choices, size, and the cost of its smallest and largest members")
    sshow.add_argument("name", help="a registered space (see 'nas spaces')")
    sshow.add_argument("--config", help="take the space's options, embedding size and channels from this experiment YAML")
    sshow.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a space option as YAML, e.g. widths=[0.5,1.0]")
    sshow.add_argument("--embed-dim", type=_int_in(2), help="embedding dimension of the head (default 128, or the config's)")
    sshow.add_argument("--in-chans", type=int, choices=(1, 3), help="input channels (default 1; 3 with --gallery-model)")
    sshow.add_argument("--gallery-model", help="gallery/pruned: the timm model rooting the space (any supported family)")
    sshow.add_argument("--resolution", type=int, help="gallery/pruned: the one input resolution to show")
    baseline = sub.add_parser("baseline", help="train off-the-shelf timm models like a trial and record them beside the study's trials")
    _add_config_overrides(baseline)
    baseline.add_argument(
        "--models", default="mobilenetv3_small_050,mobilenetv3_small_100,lcnet_050,efficientnet_lite0,resnet18",
        help="comma-separated timm model names (default: five small ImageNet designs)",
    )
    baseline.add_argument("--resolutions", default="32", help="comma-separated input resolutions, each >= 32 (default 32)")
    baseline.add_argument("--threads", type=int, help="torch threads for training")

    profile = sub.add_parser("profile", help="measure candidates: MFLOPs, params, memory, measured and predicted latency")
    what = profile.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", help="an architecture string (as 'nas results' prints) or an arch.json file")
    what.add_argument("--timm", help="a timm model name, e.g. mobilenetv3_small_050")
    what.add_argument("--space", help="profile --sample random members of this registered space")
    profile.add_argument("--sample", type=_int_in(1), default=5, help="with --space: how many members (default 5)")
    profile.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0, help="with --space: sampling seed")
    profile.add_argument("--resolution", type=_int_in(8), help="input resolution (--timm: default 32, or gallery.resolution for the config's gallery model)")
    profile.add_argument("--config", help="take latency settings, embedding size, channels and space options from this experiment YAML")
    profile.add_argument("--runtime", help="a registered latency runtime (default: the config's, else torch)")
    profile.add_argument("--threads", type=_int_in(1), help="threads of the runtime")
    profile.add_argument("--batch-size", type=_int_in(1), help="batch size of the latency and memory measurements")
    profile.add_argument("--table-dir", help="folder of the latency lookup tables")
    profile.add_argument("--refresh", action="store_true", help="re-measure the lookup table's entries for these candidates and replace them")
    profile.add_argument("--embed-dim", type=_int_in(0), help="embedding size (default 128, or the config's; 0 with --timm: no embedding layer)")
    profile.add_argument("--in-chans", type=int, choices=(1, 3), help="input channels (default 1, or the config's)")
    return parser


def _quiet_libraries() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("alembic", "mlflow", "urllib3", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _load_study(args: argparse.Namespace):
    """The study ``nas results`` / ``export`` / ``report`` read: from ``--storage``, else ``<run dir>/optuna.db``."""
    from nas.search.optuna_setup import load_existing_study

    return load_existing_study(_storage_url(args), args.study_name)


def _storage_url(args: argparse.Namespace) -> str:
    """The storage URL of ``--storage``, else of ``<run dir>/optuna.db``."""
    from nas.search.optuna_setup import reader_storage_url

    return reader_storage_url(args.storage, args.run_dir, args.study_name)


def _output_path(path: str, flag: str, folder: bool) -> Path:
    """``path`` of ``flag`` checked before any work: a folder to write into (``folder``), else a file to write."""
    from nas.errors import ConfigError

    target = Path(path)
    if folder and target.exists() and not target.is_dir():
        raise ConfigError(f"{flag} {target} is a file, but it must be a folder (new or existing); pass another path. Nothing was written.")
    if not folder and target.is_dir():
        raise ConfigError(f"{flag} {target} is a folder, but it must be a file; pass e.g. {target / 'embeddings.npy'}. Nothing was written.")
    above = next((p for p in target.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"{flag} {target} lies under {above}, which is a file, not a folder; pass another path. Nothing was written.")
    return target


def _run_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Config overrides from the flags ``search`` and ``worker`` share (None: not given)."""
    return {
        "out": args.out,
        "search.study_name": args.study_name,
        "search.storage": args.storage,
        "tracking.uri": args.tracking_uri,
        "search.timeout": getattr(args, "timeout", None),
        "search.threads": args.threads,
        "train.device": getattr(args, "device", None),
    }


def _parse_options(pairs: Sequence[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs, each value parsed as YAML (``widths=[0.5,1]`` is a list)."""
    import yaml

    from nas.errors import ConfigError

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option takes KEY=VALUE (the value as YAML, e.g. widths=[0.5,1.0]), but got {pair!r}.")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--option {key}: {value!r} is not valid YAML ({exc}).") from None
    return options


def _space_from_args(args: argparse.Namespace):
    from nas.config import load_config
    from nas.errors import ConfigError
    from nas.study_nets import gallery_width, space_options
    from search_spaces import create_space

    options: dict[str, object] = {}
    embed_dim, in_chans = args.embed_dim or 128, args.in_chans or (3 if args.gallery_model else 1)
    assumed = [f"{in_chans} input channel(s)" if not args.in_chans else "", "a 128-d embedding projection" if not args.embed_dim else ""]
    said = "" if args.config or not any(assumed) else f"Assumed (no --config): {', '.join(a for a in assumed if a)}."
    if args.config:  # shaped as the study shapes it
        config = load_config(args.config)
        options.update(space_options(config, args.name))
        in_chans = config.data.resolved_channels
        embed_dim = gallery_width(config.gallery, in_chans)
    options.update(_parse_options(args.option))
    if args.gallery_model:
        if options.get("model", args.gallery_model) != args.gallery_model:  # not the config's gallery: it projects to the embedding
            options["identity_head"] = False
        options["model"] = args.gallery_model
    if args.resolution:
        options["resolutions"] = [args.resolution]
    try:
        return create_space(args.name, embed_dim=embed_dim, in_chans=in_chans, **options), said
    except (ValueError, TypeError) as exc:
        if args.name != "gallery" or "cannot root the gallery space" not in str(exc):
            raise ConfigError(str(exc)) from None
        note = f"{exc} Shown instead: its structured prunings, the 'pruned' space (any supported family; space.name: pruned)."
    pruned = {k: v for k, v in options.items() if k in ("model", "resolutions", "min_depth", "identity_head")}  # what both spaces take
    try:
        return create_space("pruned", embed_dim=embed_dim, in_chans=in_chans, **pruned), f"{note}\n\n{said}".strip()
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def _profile(args: argparse.Namespace) -> int:
    import dataclasses

    from nas.config import LatencyConfig, load_config
    from nas.errors import ConfigError
    from nas.hardware.latency_table import LatencyTable
    from nas.hardware.profile import profile_architecture, profile_table
    from nas.study_nets import profile_candidates

    config = load_config(args.config) if args.config else None
    latency = config.budgets.latency if config is not None else LatencyConfig()
    changes = {"runtime": args.runtime, "threads": args.threads, "batch_size": args.batch_size, "table_dir": args.table_dir}
    try:
        latency = dataclasses.replace(latency, **{k: v for k, v in changes.items() if v is not None})
        archs, shaped = profile_candidates(
            arch=args.arch, timm_name=args.timm, space=args.space, sample=args.sample, seed=args.seed, resolution=args.resolution,
            embed_dim=args.embed_dim, in_chans=args.in_chans, config=config, config_name=args.config or "",
        )
        if shaped:
            print(shaped)
        table = LatencyTable(latency, log=print)
        profiles = [profile_architecture(arch, latency, log=print, table=table, refresh=args.refresh) for arch in archs]
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    except (RuntimeError, AssertionError) as exc:  # e.g. a ViT built for 224 px asked for another --resolution
        raise ConfigError(f"The candidate does not run at this input resolution: {str(exc).strip().rstrip('.')}. Pass the --resolution it takes.") from None
    print(profile_table(profiles, latency, table))
    return 0


def _run(args: argparse.Namespace) -> int:
    from nas.config import load_config

    if args.command == "search":
        from nas.results import summary
        from nas.search.driver import run_search
        from nas.search.preflight import check_search_request
        from nas.search.workers import run_local_workers

        overrides = {
            **_run_overrides(args),
            "search.trials": args.trials,
            "search.seed": args.seed,
            "search.sampler": args.sampler,
            "search.objectives": args.objectives.split(",") if args.objectives else None,
            "budgets.max_mflops": args.max_mflops,
            "budgets.max_latency_ms": args.max_latency_ms,
            "budgets.max_params_m": args.max_params_m,
            "budgets.max_memory_mb": args.max_memory_mb,
        }
        config = load_config(args.config, overrides)
        check_search_request(config)  # --trials 0, a bad warm start: before any data is loaded
        if args.workers > 1:
            from nas.search.optuna_setup import check_storage

            check_storage(config.storage_url)  # once here, not once per worker process
            study = run_local_workers(config, args.workers)
        else:
            study = run_search(config)
        print()
        print(summary(study, config))
        return 0
    if args.command == "worker":
        import socket

        from nas.search.driver import run_search

        config = load_config(args.config, _run_overrides(args))
        run_search(config, total_trials=args.trials, worker=f"{socket.gethostname()}-{os.getpid()}", request=args.request)
        return 0
    if args.command == "supernet":
        from nas.search.driver import train_study_supernet

        train_study_supernet(load_config(args.config, _run_overrides(args)))
        return 0
    if args.command == "gallery":
        from nas.data import load_retrieval_data
        from nas.search.context import ensure_gallery

        config = load_config(args.config, {"out": args.out})
        retrieval = load_retrieval_data(config.data)
        _, sha, path = ensure_gallery(config, retrieval.data, retrieval.split, retrain=args.force)
        print(f"Gallery model: {path or config.gallery.model} (weights sha256 {sha[:12]})")
        return 0
    if args.command == "export":
        from nas.export import export_trial

        _output_path(args.out, "--out", folder=True)
        study = _load_study(args)
        if args.family:
            from nas.export.family import export_family

            rows = export_family(study, _storage_url(args), args.family, args.out, formats=args.format, tracking_uri=args.tracking_uri)
            print(f"Family written to {args.out} (FAMILY.md, one folder per device); load one with nas.load_query_model(FOLDER).")
            failed = [r["device"] for r in rows if "failed" in r]
            if failed:
                print(f"No member for {', '.join(failed)}: FAMILY.md says why.", file=sys.stderr)
            return 1 if failed else 0
        export_trial(study, args.trial, args.out, formats=args.format, tracking_uri=args.tracking_uri)
        print(f"Export written to {args.out}; load it with nas.load_query_model({str(args.out)!r}).")
        return 0
    if args.command == "report":
        from nas.report import log_report_to_mlflow, write_report

        if args.out:
            _output_path(args.out, "--out", folder=True)
        study = _load_study(args)
        from nas.records import StudyRecord

        run_dir = Path(args.run_dir) if args.run_dir else Path(StudyRecord.load(study).out_dir or Path("runs") / args.study_name)
        files = write_report(study, Path(args.out) if args.out else run_dir / "report", top=args.top)
        for path in files:
            if path.suffix == ".txt":
                print(f"== {path.name}\n{path.read_text()}")
        logged = log_report_to_mlflow(study, files, args.tracking_uri)
        print("Report files: " + ", ".join(str(p) for p in files))
        print(logged)
        return 0
    if args.command == "results":
        from nas.records import StudyRecord
        from nas.results import baselines_table, front_cost, pareto_table, results_table

        study = _load_study(args)
        print(results_table(study))
        print(f"\nPareto front of val mAP against {front_cost(study)} (export one with --trial pareto:K):")
        print(pareto_table(study))
        if StudyRecord.load(study).baselines:
            print("\nHand-designed baselines (nas baseline), trained and scored like a trial:")
            print(baselines_table(study))
        return 0
    if args.command == "embed":
        import numpy as np

        from nas.export import embed_folder

        from nas.errors import DataError

        out = _output_path(args.out, "--out", folder=False)
        out = out if out.suffix == ".npy" else out.with_name(out.name + ".npy")  # as np.save names it
        embeddings, ids, skipped = embed_folder(args.export_dir, args.images)  # no readable image: an error, nothing written
        ids_file = out.with_suffix(".ids.txt")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            np.save(out, embeddings)
            ids_file.write_text("".join(f"{i}\n" for i in ids))
        except OSError as exc:
            raise DataError(f"Cannot write the embeddings to {out}: {exc}. Pass an --out FILE.npy in a writable folder.") from None
        print(f"Embedded {len(ids)} image(s) -> {out} ({embeddings.shape[0]} x {embeddings.shape[1]}), ids -> {ids_file}")
        if skipped:
            print(f"Skipped {len(skipped)} unreadable image(s):")
            for path, reason in skipped:
                print(f"  {path}: {reason}")
        return 0
    if args.command == "ui":
        from nas.ui import ui_command

        return ui_command(args)
    if args.command == "dashboard":
        from nas.dashboard import dashboard_command

        return dashboard_command(args)
    if args.command == "query":
        from nas.query import query_command

        return query_command(args)
    if args.command == "spaces":
        from search_spaces import list_spaces, space_options

        for name in list_spaces():
            print(f"{name}: options {', '.join(space_options(name))}")
        return 0
    if args.command == "profile":
        return _profile(args)
    if args.command == "baseline":
        from nas.baselines import run_baselines
        from nas.results import baselines_table
        from nas.errors import ConfigError

        config = load_config(args.config, _run_overrides(args))
        try:
            resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
        except ValueError:
            raise ConfigError(f"--resolutions takes comma-separated integers, e.g. 32,48, but got {args.resolutions!r}.") from None
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models or not resolutions:  # else an empty table and exit status 0
            raise ConfigError("--models and --resolutions must each name at least one, e.g. --models resnet18 --resolutions 32.")
        study = run_baselines(config, models, resolutions)
        print(baselines_table(study))
        return 0
    if args.command == "space":
        from nas.hardware.profile import space_report

        space, note = _space_from_args(args)
        print((f"{note}\n\n" if note else "") + space_report(space))
        return 0
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in logs
    _quiet_libraries()
    mask_process_output()  # log lines and an unexpected traceback show no secret
    if getattr(args, "quiet", False):
        os.environ["NAS_QUIET"] = "1"  # nas.progress_bars: this process and the loader workers it starts
    from nas.errors import NasError

    try:
        return _run(args)
    except NasError as exc:
        print(f"error: {mask_text(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nas results | head`: the reader stopped reading; exit as a program killed by SIGPIPE does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
