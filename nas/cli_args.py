"""The arguments of ``nas query``, ``nas dashboard`` and ``nas ui``.

Only argparse here, so that ``nas --help`` stays quick; the commands themselves are
:func:`nas.query.query_command`, :func:`nas.dashboard.dashboard_command` and :func:`nas.ui.ui_command`.
"""

from __future__ import annotations

import argparse

__all__ = ["add_query_parser", "add_dashboard_parser", "add_ui_parser", "INDEX_CHOICES"]

#: ``--index`` (:data:`nas.retrieval_index.INDEX_KINDS`; repeated here so the parser imports nothing heavy).
INDEX_CHOICES = ("auto", "flat", "hnsw", "ivf", "ivfpq")


def _at_least_1(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, but got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, but got {value}")
    return value


def _port(text: str) -> int:
    value = _at_least_1(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, but got {value}")
    return value


def add_query_parser(sub: argparse._SubParsersAction) -> None:
    query = sub.add_parser("query", help="the top-k gallery items of query photos, with an exported query network")
    query.add_argument("export_dir", help="folder written by 'nas export'")
    query.add_argument("photos", nargs="+", metavar="PHOTO", help="query image file(s)")
    query.add_argument("--gallery-embeddings", required=True, metavar="FILE.npy", help="the gallery's embeddings written by 'nas embed' (its ids: FILE.ids.txt)")
    query.add_argument("-k", type=_at_least_1, default=10, help="gallery items per photo (default 10)")
    query.add_argument("--index", choices=INDEX_CHOICES, default="flat",
                       help="faiss index: flat (exact, the default), hnsw, ivf, ivfpq (approximate, cached beside the embeddings), "
                            "auto (flat below 100000 vectors, else ivf)")
    query.add_argument("--nprobe", type=_at_least_1, help="ivf/ivfpq: lists searched (default max(8, nlist/64))")
    query.add_argument("--ef-search", type=_at_least_1, help="hnsw: efSearch (default 128)")
    query.add_argument("--json", action="store_true", help="print the results as JSON")
    query.add_argument("--html", metavar="PATH", help="also write a page with each photo and its top-k thumbnails")
    query.add_argument("--gallery-root", metavar="DIR", help="for --html: the folder 'nas embed' read (the ids are paths relative to it)")


def _add_port(parser: argparse.ArgumentParser, flag: str, default: int) -> None:
    parser.add_argument(flag, type=_port, default=default, help=f"local port (default {default})")


def add_dashboard_parser(sub: argparse._SubParsersAction) -> None:
    dashboard = sub.add_parser("dashboard", help="start optuna-dashboard on 127.0.0.1 for a study's storage")
    dashboard.add_argument("--study-name", help="the study; its storage is runs/<study name>/optuna.db unless --run-dir or --storage")
    dashboard.add_argument("--run-dir", help="the search's output folder (its optuna.db)")
    dashboard.add_argument("--storage", help="an Optuna storage URL (env:NAME reads it from that variable) instead")
    _add_port(dashboard, "--port", 8080)


def add_ui_parser(sub: argparse._SubParsersAction) -> None:
    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for a study's tracking store")
    ui.add_argument("--study-name", help="the study; its store is runs/<study name>/mlflow.db unless --run-dir or --tracking-uri")
    ui.add_argument("--run-dir", help="the search's output folder")
    ui.add_argument("--tracking-uri", help="an MLflow backend store URI to browse instead")
    _add_port(ui, "--port", 5000)
    ui.add_argument("--with-dashboard", action="store_true", help="also serve optuna-dashboard for the study (its --run-dir optuna.db or --storage)")
    ui.add_argument("--storage", help="with --with-dashboard: an Optuna storage URL (env:NAME allowed) instead of <run dir>/optuna.db")
    _add_port(ui, "--dashboard-port", 8080)
