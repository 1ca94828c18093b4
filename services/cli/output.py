"""What commands print, as gh and kubectl do: a table on a terminal, JSON when piped, ``-o`` to choose.

``-o table`` (lists as columns, one resource as ``field: value`` lines), ``-o wide`` (more columns, every field),
``-o json``, ``-o yaml``, ``-o id`` (ids only, one per line: ``ADAPTER=$(krona adapters list --limit 1 -o id)``).
Messages about what happened go to stderr, so stdout holds only the resource.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = ["FORMATS", "add_output_option", "emit", "output_format", "print_table", "to_data"]

FORMATS = ("table", "wide", "json", "yaml", "id")
Column = tuple[str, Callable[[dict], Any]]


def add_output_option(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    when = f"default: {default}" if default else "default: table on a terminal, json when piped"
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default=default,
        metavar="FORMAT",
        help=f"table, wide, json, yaml or id ({when})",
    )


def output_format(args: argparse.Namespace) -> str:
    chosen = getattr(args, "output", None)
    if chosen:
        return chosen
    return "table" if sys.stdout.isatty() else "json"


def to_data(value: Any) -> Any:
    """Plain JSON data of a model, a list of models or a dict (models keep the fields the client does not know)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_unset=True)  # what the server sent, nothing the client assumed
    if isinstance(value, dict):
        return {k: to_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_data(v) for v in value]
    return value


# Cells -------------------------------------------------------------------------------------------------------


def when(value: Any) -> str:
    """An API timestamp as 'YYYY-MM-DD HH:MM' (UTC), '-' for none."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M")


def size(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _get(*path: str, fmt: Callable[[Any], str] = lambda v: "-" if v is None else str(v)) -> Callable[[dict], str]:
    def read(row: dict) -> str:
        value: Any = row
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return fmt(value)

    return read


def _training_step(row: dict) -> str:
    progress = row.get("progress") or {}
    return f"{progress.get('step', 0)}/{progress.get('total_steps', 0)}"


def _training_phase(row: dict) -> str:
    # lazy: loads httpx, krona_sdk, pydantic
    from krona_sdk import Training

    return Training.model_validate(row).phase.replace("_", " ")


def _error(row: dict) -> str:
    error = row.get("error")
    return f"{error.get('code')}: {error.get('message')}" if isinstance(error, dict) else "-"


def _evaluation(row: dict) -> str:
    evaluation = row.get("evaluation")
    if not isinstance(evaluation, dict):
        return "-"
    if evaluation.get("status") != "succeeded":
        return str(evaluation.get("status"))
    return " ".join(f"{k}={evaluation[k]:.3f}" for k in ("clip_i", "clip_t", "dino") if evaluation.get(k) is not None)


def _factors(row: dict) -> str:
    config = row.get("config") or {}
    return f"{config.get('a1', '?')}x{config.get('a2', '?')}"


def _overrides(row: dict) -> str:
    limits = row.get("limits") or {}
    return ", ".join(f"{k}={number(v)}" for k, v in sorted(limits.items())) or "-"


def _count(status: str) -> Callable[[dict], str]:
    return lambda row: str((row.get("counts") or {}).get(status, 0))


COLUMNS: dict[str, tuple[list[Column], list[Column]]] = {
    # kind: (table columns, extra columns of -o wide)
    "training": (
        [
            ("ID", _get("id")),
            ("NAME", _get("name")),
            ("STATUS", _get("status")),
            ("PHASE", _training_phase),
            ("STEP", _training_step),
            ("LOSS", _get("progress", "loss", fmt=number)),
            ("ADAPTER", _get("adapter_id")),
            ("CREATED", _get("created_at", fmt=when)),
        ],
        [
            ("IMAGES", _get("num_images")),
            ("PROMPT", _get("instance_prompt")),
            ("PARAMS", _get("params", fmt=lambda v: json.dumps(v, separators=(",", ":")) if v else "-")),
            ("ERROR", _error),
            ("FINISHED", _get("finished_at", fmt=when)),
        ],
    ),
    "adapter": (
        [
            ("ID", _get("id")),
            ("NAME", _get("name")),
            ("A1xA2", _factors),
            ("PARAMETERS", _get("num_parameters", fmt=number)),
            ("SIZE", _get("size_bytes", fmt=size)),
            ("EVALUATION", _evaluation),
            ("CREATED", _get("created_at", fmt=when)),
        ],
        [
            ("BASE MODEL", _get("base_model")),
            ("TRAINING", _get("training_id")),
            ("TARGETS", _get("config", "targets", fmt=lambda v: ",".join(v) if v else "-")),
            ("SHA256", _get("sha256")),
        ],
    ),
    "generation": (
        [
            ("ID", _get("id")),
            ("STATUS", _get("status")),
            ("IMAGES", _get("num_images")),
            ("SIZE", lambda r: f"{r.get('width')}x{r.get('height')}"),
            ("STEPS", _get("steps")),
            ("ADAPTER", _get("adapter_id")),
            ("CREATED", _get("created_at", fmt=when)),
        ],
        [
            ("SEED", _get("seed")),
            ("BATCH", _get("batch_id")),
            ("PROMPT", _get("prompt")),
            ("ERROR", _error),
        ],
    ),
    "batch": (
        [
            ("ID", _get("id")),
            ("TOTAL", _get("total")),
            ("QUEUED", _count("queued")),
            ("RUNNING", _count("running")),
            ("SUCCEEDED", _count("succeeded")),
            ("FAILED", _count("failed")),
            ("CANCELED", _count("canceled")),
            ("CANCELING", _count("canceling")),
            ("CREATED", _get("created_at", fmt=when)),
        ],
        [],
    ),
    "api_key": (
        [
            ("ID", _get("id")),
            ("NAME", _get("name")),
            ("PREFIX", _get("prefix", fmt=lambda v: f"{v}…" if v else "-")),
            ("CREATED", _get("created_at", fmt=when)),
            ("LAST USED", _get("last_used_at", fmt=when)),
            ("REVOKED", _get("revoked_at", fmt=when)),
        ],
        [],
    ),
    "tenant": (
        [
            ("ID", _get("id")),
            ("NAME", _get("name")),
            ("WEIGHT", _get("weight", fmt=number)),
            ("LIMIT OVERRIDES", _overrides),
            ("CREATED", _get("created_at", fmt=when)),
        ],
        [
            (name.upper().replace("_", " "), _get("effective_limits", name, fmt=number))
            for name in (
                "rate_limit_per_second",
                "rate_limit_burst",
                "max_queued_jobs",
                "max_running_jobs",
                "max_generation_compute",
            )
        ],
    ),
    "usage": (
        [
            ("PERIOD", _get("period")),
            ("KIND", _get("kind")),
            ("JOBS", _get("jobs", fmt=number)),
            ("WORKER S", _get("worker_seconds", fmt=lambda v: f"{v:.1f}" if v is not None else "-")),
            ("IMAGES", _get("images", fmt=number)),
            ("STEPS", _get("steps", fmt=number)),
            ("PIXELS", _get("pixels", fmt=number)),
        ],
        [("DEVICES (S)", _get("devices", fmt=lambda v: ", ".join(f"{d}={s:.1f}" for d, s in (v or {}).items())))],
    ),
}


# Emitters ----------------------------------------------------------------------------------------------------


def print_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, file=None) -> None:
    """Columns padded to their widest cell; '(none)' under the header when there are no rows."""
    file = file or sys.stdout
    cells = [list(header), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=file)
    if len(cells) == 1:
        print("(none)", file=file)


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``field: value`` lines of a resource, nested fields as ``a.b``."""
    lines: list[tuple[str, str]] = []
    if isinstance(data, dict) and data:
        for key, value in data.items():
            lines.extend(_flatten(value, f"{prefix}{key}."))
        return lines
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for index, value in enumerate(data):
            lines.extend(_flatten(value, f"{prefix}{index}."))
        return lines
    if isinstance(data, list):
        text = ", ".join(str(v) for v in data) or "-"
    elif data is None or data == {}:
        text = "-"
    else:
        text = number(data) if isinstance(data, float | bool) else str(data)
    return [(prefix.rstrip("."), text)]


DETAIL_FIELDS = {
    # what `-o table` shows of one resource (all of them with -o wide)
    "training": ("id", "name", "status", "progress", "adapter_id", "error", "params", "num_images", "created_at",
                 "finished_at"),
    "adapter": ("id", "name", "base_model", "config", "num_parameters", "size_bytes", "sha256", "training_id",
                "evaluation", "created_at"),
    "generation": ("id", "status", "prompt", "adapter_id", "adapter_scale", "num_images", "steps", "width", "height",
                   "seed", "batch_id", "images", "error", "created_at", "finished_at"),
}  # fmt: skip


def _detail(data: dict, kind: str | None, wide: bool) -> None:
    fields = DETAIL_FIELDS.get(kind or "")
    if fields and not wide:
        data = {k: data[k] for k in fields if data.get(k) is not None}
        if isinstance(data.get("params"), dict):
            data["params"] = json.dumps(data["params"], separators=(", ", ": "))
        if isinstance(data.get("progress"), dict):
            data["progress"] = {k: v for k, v in data["progress"].items() if v is not None}
    lines = _flatten(data)
    width = max((len(k) for k, _ in lines), default=0)
    for key, value in lines:
        print(f"{key}:".ljust(width + 2) + value)


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z_./][\w ./@+-]*", text) and text.strip() == text
    special = text.lower() in ("true", "false", "null", "yes", "no", "on", "off", "~")
    return text if plain and not special else json.dumps(text, ensure_ascii=False)


def _yaml_inline(value: Any) -> str:
    if value == {}:
        return "{}"
    if value == []:
        return "[]"
    return _yaml_scalar(value)


def to_yaml(data: Any, indent: int = 0) -> str:
    """YAML (block style) of JSON data; strings that could be misread are quoted as JSON strings."""
    pad = "  " * indent
    if isinstance(data, dict) and data:
        out = []
        for key, value in data.items():
            if isinstance(value, dict | list) and value:
                out.append(f"{pad}{key}:\n{to_yaml(value, indent + 1)}")
            else:
                out.append(f"{pad}{key}: {_yaml_inline(value)}\n")
        return "".join(out)
    if isinstance(data, list) and data:
        out = []
        for value in data:
            if isinstance(value, dict | list) and value:
                out.append(f"{pad}- {to_yaml(value, indent + 1).lstrip()}")
            else:
                out.append(f"{pad}- {_yaml_inline(value)}\n")
        return "".join(out)
    return f"{pad}{_yaml_inline(data)}\n"


def emit(value: Any, fmt: str, kind: str | None = None, *, page: bool = False) -> None:
    """Print ``value`` (a model, a list of models, a page dict, plain data) in ``fmt``.

    ``kind`` picks the columns (training, adapter, generation, batch, api_key, tenant, usage). A list prints as a
    table; in JSON and YAML, ``page=True`` keeps the API's list shape ``{"data": [...], "next_cursor": ...}``.
    """
    data = to_data(value)
    items = data.get("data") if page and isinstance(data, dict) else data
    if fmt == "json":
        print(json.dumps(data, indent=2, ensure_ascii=False))
    elif fmt == "yaml":
        sys.stdout.write(to_yaml(data))
    elif fmt == "id":
        for row in items if isinstance(items, list) else [items]:
            if isinstance(row, dict) and row.get("id"):
                print(row["id"])
    elif isinstance(items, list):
        columns, wide = COLUMNS.get(kind or "", ([], []))
        if not columns:
            keys = list(dict.fromkeys(k for row in items for k in row)) if items else []
            columns = [(k.upper(), _get(k)) for k in keys]
        if fmt == "wide":
            columns = columns + wide
        print_table([h for h, _ in columns], [[read(row) for _, read in columns] for row in items])
        if page and isinstance(data, dict) and data.get("next_cursor"):
            print(f"more: --cursor {data['next_cursor']}  (or --all)", file=sys.stderr)
    elif isinstance(items, dict):
        _detail(items, kind, fmt == "wide")
    else:
        print(items)
