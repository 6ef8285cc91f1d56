"""Where edit records come from, read lazily: record files, Parquet files, folders, `datasets` objects, cached Hub ids.

`open_source(source, split)` turns any supported source into a `RawSource`: a label that names the source in error
messages and a lazy iterator of (object, position) pairs. `schemas.iter_records` parses and validates the objects.

Sources and how they are read:

- A JSON or JSON Lines file (any name but *.parquet): this module's own streaming reader. A JSON list is decoded one
  element at a time from 1 MiB chunks, JSON Lines one line at a time, so memory stays bounded by the largest record,
  and positions are exact: "record 3", "record 3 (line 5)"; corrupt input is reported by line and column. (The
  `datasets` JSON builder would lose the line numbers, turn absent keys into nulls, reject a column whose type varies
  between records before any record could be named, and write an Arrow copy of the file to the cache.)
- A Parquet file: `datasets.load_dataset("parquet", ..., streaming=True)`; positions "row i".
- A folder: written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` -> `datasets.load_from_disk` (memory
  mapped); any other folder of data files -> `datasets.load_dataset(folder, streaming=True)` (its split naming rules).
- A `datasets.Dataset`, `IterableDataset`, `DatasetDict` or `IterableDatasetDict`: rows in order, "row i".
- Any other string of the form "name" or "owner/name" that is not an existing path: a Hub dataset id, read with
  `datasets.load_dataset(id, streaming=True)`. With HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 (the project's
  default) that reads the local `datasets` cache (HF_DATASETS_CACHE) and nothing else.

A source with several splits needs `split=`; one with a single split uses it. Arrow rows carry every column, so keys
a record does not have arrive as None: they are removed, which makes a row look like the JSON object it came from.

`datasets` is imported only for the sources that need it; JSON and JSON Lines files load without it.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass
from typing import Any
from typing import Iterator

from emsedit_fast.data.schemas import DataError

CHUNK_BYTES = 1 << 20  # JSON list reader: bytes per read
_COMPACT_CHARS = 1 << 16  # JSON list reader: drop the consumed prefix of the buffer once it is this long
_WS = re.compile(r"[ \t\n\r]*")  # JSON insignificant whitespace
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".gz", ".zip")


@dataclass
class RawSource:
    """label: names the source in messages (a path, "Dataset split 'train'", "owner/name split 'train'").
    items: lazy iterator of (object, position), position like "record 3 (line 5)" or "row 3"."""

    label: str
    items: Iterator[tuple[Any, str]]


def describe(source: Any) -> str:
    """A short name for `source` before it is opened (for errors that come before any reading)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return type(source).__name__


# ----------------------------------------------------------------------------------------------------------------------
# JSON and JSON Lines files


def _utf8_error(path: str, offset: int, err: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not valid UTF-8 at byte {offset + err.start}: {err.reason}")


def _nested(path: str) -> DataError:
    return DataError(f"{path}: JSON nested too deeply to be a records file")


def _json_file(path: str) -> Iterator[tuple[Any, str]]:
    """Objects of a JSON list or JSON Lines file, by the first non-blank character ('[' or '{')."""
    try:
        fh = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    with fh:
        head = b""
        while True:  # up to the first significant byte (a file may start with blank lines)
            more = fh.read(4096)
            head += more
            if head.removeprefix(codecs.BOM_UTF8).lstrip() or not more:
                break
        body = head.removeprefix(codecs.BOM_UTF8).lstrip()
        if not body:
            raise DataError(f"{path}: file is empty")
        first = body[:1]
        fh.seek(0)
        if first == b"[":
            yield from _json_list(path, fh)
        elif first == b"{":
            yield from _json_lines(path, fh)
        else:
            char = body[:4].decode("utf-8", "replace")[:1]
            raise DataError(f"{path}: expected a JSON list or JSON Lines of objects, but the file starts with {char!r}")


def _json_lines(path: str, fh) -> Iterator[tuple[Any, str]]:
    """JSON Lines, one object per line (blank lines skipped); a single pretty-printed object is accepted too."""
    offset = 0
    index = 0
    for lineno, raw in enumerate(fh, start=1):
        start, offset = offset, offset + len(raw)
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _utf8_error(path, start, err) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except RecursionError:
            raise _nested(path) from None
        except json.JSONDecodeError as err:
            if index == 0:
                whole = _single_object(path, fh)
                if whole is not None:
                    yield whole, "record 0"
                    return
            raise DataError(f"{path}: corrupt or truncated JSON Lines record at line {lineno}, column {err.colno}: "
                            f"{err.msg}") from None
        yield obj, f"record {index} (line {lineno})"
        index += 1


def _single_object(path: str, fh) -> Any | None:
    """The whole file as one JSON object (a pretty-printed single record), or None if it is not one."""
    fh.seek(0)
    raw = fh.read()
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except RecursionError:
        raise _nested(path) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


class _ListReader:
    """Incremental reader of one JSON list: `buf` holds the decoded text not consumed yet, from file character `base`.

    line/col of a buffer position p: lines = base_lines + newlines in buf[:p]; the column counts from the last
    newline, or continues base_col when buf[:p] has none. Used for corrupt-input messages like json.loads gives.
    """

    def __init__(self, path: str, fh):
        self.path, self.fh = path, fh
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.eof = "", False
        self.base = self.base_lines = self.base_col = 0
        self.read_bytes = 0

    def fill(self) -> None:
        raw = self.fh.read(CHUNK_BYTES)
        self.eof = not raw
        held = len(self.utf8.getstate()[0])  # bytes of a character cut by the previous chunk, decoded with this one
        try:
            self.buf += self.utf8.decode(raw, final=self.eof)
        except UnicodeDecodeError as err:
            raise _utf8_error(self.path, self.read_bytes - held, err) from None
        self.read_bytes += len(raw)

    def compact(self, pos: int) -> int:
        """Forget buf[:pos]; returns the new index of what was at pos."""
        if pos < _COMPACT_CHARS:
            return pos
        dropped = self.buf[:pos]
        newlines = dropped.count("\n")
        self.base_lines += newlines
        self.base_col = pos - dropped.rfind("\n") - 1 if newlines else self.base_col + pos
        self.base += pos
        self.buf = self.buf[pos:]
        return 0

    def skip_ws(self, pos: int) -> int:
        """Index of the next significant character (reading on as needed); len(buf) at the end of the file."""
        while True:
            pos = _WS.match(self.buf, pos).end()
            if pos < len(self.buf) or self.eof:
                return pos
            pos = self.compact(pos)
            self.fill()

    def error(self, pos: int, msg: str) -> DataError:
        lineno = self.base_lines + self.buf.count("\n", 0, pos) + 1
        last = self.buf.rfind("\n", 0, pos)
        col = pos - last if last >= 0 else self.base_col + pos + 1
        return DataError(f"{self.path}: corrupt or truncated JSON at line {lineno}, column {col} "
                         f"(character {self.base + pos}): {msg}")

    def value(self, pos: int) -> tuple[Any, int]:
        """Decode the value at pos. A value cut by the end of the buffer fails to decode: read more and retry; only
        at the end of the file is the error real (so a corrupt file is read to its end before it is reported)."""
        decoder = json.JSONDecoder()
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, pos)
                if end < len(self.buf) or self.eof:  # a number or literal ending the buffer may go on in the file
                    return obj, end
            except RecursionError:
                raise _nested(self.path) from None
            except json.JSONDecodeError as err:
                if self.eof:
                    raise self.error(err.pos, err.msg) from None
            pos = self.compact(pos)
            self.fill()


def _json_list(path: str, fh) -> Iterator[tuple[Any, str]]:
    r = _ListReader(path, fh)
    r.fill()
    pos = r.skip_ws(0) + 1  # past "["
    pos = r.skip_ws(pos)
    if r.buf[pos:pos + 1] == "]":
        pos += 1
    else:
        index = 0
        while True:
            if pos >= len(r.buf):
                raise r.error(pos, "Expecting value")
            obj, pos = r.value(pos)
            yield obj, f"record {index}"
            index += 1
            pos = r.skip_ws(r.compact(pos))
            sep = r.buf[pos:pos + 1]
            if sep == "]":
                pos += 1
                break
            if sep != ",":
                raise r.error(pos, "Expecting ',' delimiter")
            pos = r.skip_ws(pos + 1)
    pos = r.skip_ws(pos)
    if pos < len(r.buf):
        raise r.error(pos, "Extra data")


# ----------------------------------------------------------------------------------------------------------------------
# datasets


def _datasets(label: str, what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{label}: reading {what} needs the `datasets` package (pip install datasets); JSON and JSON "
                        "Lines record files load without it") from None
    return datasets


def _is_datasets_object(source: Any) -> bool:
    return type(source).__module__.split(".")[0] == "datasets"


def _pick_split(splits: dict, split: str | None, label: str):
    names = list(splits)
    if split is None:
        if len(names) == 1:
            return names[0], splits[names[0]]
        raise DataError(f"{label}: has splits {names}; pass split= one of them")
    if split not in splits:
        raise DataError(f"{label}: no split {split!r}; splits: {names}")
    return split, splits[split]


def _rows(dataset, label: str) -> Iterator[tuple[Any, str]]:
    """Rows of a Dataset / IterableDataset as plain dicts without None values, with "row i" positions."""
    plain = dataset.with_format(None)  # a torch/numpy format would turn strings into arrays
    index = 0
    iterator = iter(plain)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as err:  # Arrow / builder errors while streaming, e.g. a type that varies between files
            raise DataError(f"{label}: cannot read row {index}: {type(err).__name__}: {err}") from None
        if isinstance(row, dict):
            row = {k: v for k, v in row.items() if v is not None}
        yield row, f"row {index}"
        index += 1


def _from_datasets_object(obj, split: str | None, name: str) -> RawSource:
    datasets = _datasets(name, "a datasets object")
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        split, obj = _pick_split(obj, split, name)
    elif not isinstance(obj, (datasets.Dataset, datasets.IterableDataset)):
        raise DataError(f"{name}: expected a datasets Dataset, IterableDataset, DatasetDict or IterableDatasetDict")
    elif split is not None and obj.split is not None and str(obj.split) != split:
        raise DataError(f"{name}: is split {str(obj.split)!r}, not {split!r}")
    split = split if split is not None else (str(obj.split) if obj.split is not None else None)
    label = f"{name} split {split!r}" if split is not None else name
    return RawSource(label, _rows(obj, label))


def _load_dataset(label: str, what: str, *args, **kwargs):
    """datasets.load_dataset(*args, streaming=True, **kwargs): rows are read lazily and nothing is cached."""
    datasets = _datasets(label, what)
    try:
        loaded = datasets.load_dataset(*args, streaming=True, **kwargs)
    except Exception as err:
        if what == "a Hub dataset id":
            raise DataError(f"{label}: not a local file or folder, and datasets.load_dataset cannot load it as a Hub "
                            f"dataset id ({type(err).__name__}: {err}); offline, only datasets already in the local "
                            f"cache load") from None
        raise DataError(f"{label}: cannot load {what} with datasets.load_dataset: {type(err).__name__}: {err}") \
            from None
    return loaded


def _saved_folder(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def open_source(source: Any, split: str | None = None) -> RawSource:
    """The RawSource of a path, folder, Hub id or `datasets` object (see the module docstring). Raises DataError."""
    if _is_datasets_object(source):
        return _from_datasets_object(source, split, type(source).__name__)
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"cannot read records from a {type(source).__name__}: expected a file or folder path, a Hub "
                        "dataset id, or a datasets Dataset / IterableDataset / DatasetDict")
    path = os.fspath(source)
    if os.path.isdir(path):
        if _saved_folder(path):
            datasets = _datasets(path, "a saved dataset folder")
            try:
                saved = datasets.load_from_disk(path)
            except Exception as err:
                raise DataError(f"{path}: cannot load the saved dataset: {type(err).__name__}: {err}") from None
            return _from_datasets_object(saved, split, path)
        return _from_datasets_object(_load_dataset(path, "a folder of data files", path), split, path)
    is_hub_id = (isinstance(source, str) and not os.path.exists(path) and _HUB_ID.fullmatch(path) is not None
                 and not path.endswith(_DATA_SUFFIXES))
    if is_hub_id:
        return _from_datasets_object(_load_dataset(path, "a Hub dataset id", path), split, path)
    if split is not None:
        raise DataError(f"{path}: split={split!r} applies to datasets objects, folders and Hub ids, not to one file")
    if os.path.isfile(path) and path.endswith(".parquet"):
        loaded = _load_dataset(path, "a Parquet file", "parquet", data_files={"train": path})
        return RawSource(path, _rows(loaded["train"], path))
    return RawSource(path, _json_file(path))
