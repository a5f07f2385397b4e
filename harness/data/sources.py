"""Where rows come from: files (JSONL, JSON, CSV, Parquet), ``datasets.save_to_disk`` folders and
hub datasets. Each row comes with where it is (``file, line 3`` / ``file, row 3``), so that a bad
one is a one-line ``DataError`` naming the file, the row and the field.

JSONL and CSV are read here, line by line (their line numbers are what an editor shows); JSON is
an array of objects or JSON lines; Parquet through pyarrow; folders and hub ids through
``datasets`` (``load_from_disk``, ``load_dataset``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path


class DataError(ValueError):
    """A data setting that names something that does not exist, or a malformed row (a usage error)."""


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SOURCES = "a .jsonl, .json, .csv or .parquet file, or a folder written by datasets' save_to_disk"
Rows = list[tuple[str, dict]]  # (where, row)


def where(base: str, field: str | None = None) -> str:
    return base + (f", field {field!r}" if field else "")


def _one_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: byte {exc.object[exc.start]:#04x} is not UTF-8; "
                        "save the file as UTF-8") from None


def _json_lines(path: Path, text: str) -> Rows:
    rows: Rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {n}: not a JSON object ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: a row must be a JSON object, not {type(row).__name__}")
        rows.append((f"{path}, line {n}", row))
    return rows


def _json(path: Path, text: str) -> Rows:
    """A JSON array of objects (Alpaca's alpaca_data.json), or JSON lines under a .json name."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several values: JSON lines
            return _json_lines(path, text)
        raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(value, dict):
        return [(f"{path}, line 1", value)]
    if not isinstance(value, list):
        raise DataError(f"{path}: a JSON file must hold an array of objects, not {type(value).__name__}")
    for i, row in enumerate(value, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {i}: a row must be a JSON object, not {type(row).__name__}")
    return [(f"{path}, row {i}", row) for i, row in enumerate(value, 1)]


def _csv(path: Path, text: str) -> Rows:
    rows: Rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            here = f"{path}, line {reader.line_num}"
            if None in row:
                raise DataError(f"{here}: more fields than the header names")
            missing = [k for k, v in row.items() if v is None]
            if missing:
                raise DataError(f"{where(here, missing[0])}: missing (the row has fewer fields than the header)")
            rows.append((here, row))
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from None
    return rows


def _parquet(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(exc)})") from None
    return [(f"{path}, row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]


def _dataset_rows(ds, name: str) -> Rows:
    return [(f"{name}, row {i}", dict(row)) for i, row in enumerate(ds, 1)]


def _pick_split(ds, name: str, split: str | None):
    """A Dataset, or the ``split`` of a DatasetDict."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    if split in ds or (split is None and "train" in ds):
        return ds[split or "train"]
    raise DataError(f"{name} has the splits {sorted(ds)}; give one as data.split (data.split={split!r})")


def _saved_folder(path: Path, split: str | None) -> Rows:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk "
                        "(no dataset_info.json / dataset_dict.json); give a file or such a folder") from None
    return _dataset_rows(_pick_split(ds, str(path), split), str(path))


def read_path(path: Path, split: str | None = None) -> Rows:
    """Every row of a local file or save_to_disk folder, with where it is."""
    if path.is_dir():
        rows = _saved_folder(path, split)
    elif path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown extension {path.suffix!r}; use {SOURCES}")
    elif path.suffix == ".parquet":
        rows = _parquet(path)
    else:
        text = _decode(path)
        rows = {".jsonl": _json_lines, ".json": _json, ".csv": _csv}[path.suffix](path, text)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def local_path(data_cfg: dict, key: str) -> Path:
    """``data.<key>`` as an existing file or folder (DataError otherwise)."""
    value = data_cfg.get(key)
    path = Path(str(value or "")).expanduser()
    if not value or not path.exists():
        raise DataError(f"data.{key}={value!r} does not exist; give {SOURCES}")
    return path


def read_hub(data_cfg: dict) -> Rows:
    """``data.dataset``: a hub id (with ``data.config_name`` and ``data.split``) or a local file or folder."""
    name, split = str(data_cfg["dataset"]), data_cfg.get("split") or "train"
    if Path(name).expanduser().exists():
        return read_path(Path(name).expanduser(), split)
    import datasets

    try:
        ds = datasets.load_dataset(name, name=data_cfg.get("config_name"), split=split)
    except Exception as exc:  # datasets raises many kinds (offline, no such split, no such config)
        raise DataError(f"data.dataset={name!r}: {_one_line(exc)}") from None
    return _dataset_rows(ds, f"{name}[{split}]")
