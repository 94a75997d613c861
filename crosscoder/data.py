"""Text sources for harvesting: hub datasets (streamed) and local files, mixed by weight.

A record is ``{"id": str, "text": str}`` or ``{"id": str, "messages": [{"role", "content"}, ...]}``.
The same sources, weights and seed always give the same records in the same order.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class DataSourceError(RuntimeError):
    """A data source cannot be read; the message names the spec field."""


@dataclass(frozen=True)
class SourceSettings:
    path: str
    split: str = "train"
    name: str | None = None
    text_field: str | None = "text"
    messages_field: str | None = None
    weight: float = 1.0


LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def _text_lines(path: Path, field: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file, decoded line by line so that a bad byte is named exactly."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataSourceError(f"{field}.path: {path}:{number} is not UTF-8 text ({exc.reason} at byte "
                                      f"{exc.start} of the line); convert the file to UTF-8") from None
            yield number, line[:-2] + "\n" if line.endswith("\r\n") else line  # as text mode reads Windows lines


def _jsonl_rows(path: Path, field: str) -> Iterator[dict]:
    for number, line in _text_lines(path, field):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataSourceError(f"{field}.path: {path}:{number} is not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataSourceError(f"{field}.path: {path}:{number} is a JSON {type(row).__name__}, not an object "
                                  "with named fields")
        row["_line"] = number
        yield row


def _paragraph_rows(path: Path, field: str) -> Iterator[dict]:
    """Plain text, one record per blank-line-separated paragraph, streamed."""
    lines: list[str] = []
    first = 0
    for number, line in _text_lines(path, field):
        if line.strip():
            first = first or number
            lines.append(line)
        elif lines:
            yield {"text": "".join(lines), "_line": first}
            lines, first = [], 0
    if lines:
        yield {"text": "".join(lines), "_line": first}


def local_file_problem(path: str) -> str | None:
    """What is wrong with a data source path that names a local file, or None: a file suffix we read
    (case-insensitive) with no file there, or an existing file of a type we do not read. Any other path
    is taken for a hub dataset id."""
    local = Path(path).expanduser()
    suffix = local.suffix.lower()
    if suffix in LOCAL_FORMATS and not local.is_file():
        return f"no such file {path!r}"
    if suffix not in LOCAL_FORMATS and local.is_file():
        return (f"{path!r} is a file of a type this tool does not read ({local.suffix or 'no suffix'}); use one of "
                f"{', '.join(LOCAL_FORMATS)}")
    return None


def _open_source(source: SourceSettings, field: str):
    """An iterable of raw rows (dicts) for one source.

    Local jsonl and txt files are read directly (streamed, no cache); parquet, csv and hub
    datasets go through ``datasets`` in streaming mode.
    """
    path = source.path
    if path.startswith("zoo:"):
        from .zoo import resolve_data

        try:
            path = str(resolve_data(path.removeprefix("zoo:")))
        except KeyError as exc:
            raise DataSourceError(f"{field}.path: {exc.args[0] if exc.args else path}") from None
    local = Path(path).expanduser()
    suffix = local.suffix.lower()  # data.JSONL is a jsonl file too
    try:
        problem = local_file_problem(path)
        if problem:
            raise DataSourceError(f"{field}.path: {problem}")
        if suffix in LOCAL_FORMATS:
            if suffix == ".jsonl":
                return _jsonl_rows(local, field)
            if suffix == ".txt":
                return _paragraph_rows(local, field)
            import datasets

            builder = LOCAL_FORMATS[suffix]
            return datasets.load_dataset(builder, data_files=str(local), split="train", streaming=True)
        import datasets

        return datasets.load_dataset(path, source.name, split=source.split, streaming=True)
    except DataSourceError:
        raise
    except Exception as exc:  # datasets raises many types for unreachable or malformed sources
        raise DataSourceError(f"{field}.path: cannot open {path!r}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def _content_text(content) -> str | None:
    """A message's text: a string, or the text parts of a list of parts (``[{"type": "text", "text": …}]``,
    as OpenAI-style chat data writes it); None for anything else."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return "".join(str(part.get("text", "")) for part in content if part.get("type", "text") == "text")
    return None


def _to_record(row: dict, source: SourceSettings, record_id: str, field: str) -> dict | None:
    where = f"{source.path}:{row['_line']}" if "_line" in row else f"row {record_id.split(':')[1]} of {source.path}"
    if source.messages_field:
        if source.messages_field not in row:
            raise DataSourceError(f"{field}.messages_field: rows of {source.path!r} have no column {source.messages_field!r}")
        raw = row[source.messages_field]
        if not isinstance(raw, list):
            raise DataSourceError(f"{field}.messages_field: {where}: {source.messages_field!r} is a "
                                  f"{type(raw).__name__}, not a list of messages")
        messages = []
        for number, m in enumerate(raw):
            if not isinstance(m, dict) or "role" not in m:
                raise DataSourceError(f"{field}.messages_field: {where}: message {number} has no 'role' (each message "
                                      "is an object with 'role' and 'content')")
            content = _content_text(m.get("content"))
            if content is None:
                raise DataSourceError(f"{field}.messages_field: {where}: message {number}'s content is a "
                                      f"{type(m.get('content')).__name__}, not text")
            messages.append({"role": str(m["role"]), "content": content})
        # an empty turn stays (dropping it would join the turns around it); a conversation of empty turns is skipped
        if not any(m["content"].strip() for m in messages):
            return None
        # A conversation that ends on the user's turn is meant to be read up to the point where
        # the assistant is about to answer.
        return {"id": record_id, "messages": messages, "add_generation_prompt": bool(row.get("add_generation_prompt"))}
    text_field = source.text_field or "text"
    if text_field not in row:
        raise DataSourceError(f"{field}.text_field: rows of {source.path!r} have no column {text_field!r}")
    text = row[text_field]
    if not isinstance(text, str) or not text.strip():
        return None
    return {"id": record_id, "text": text}


def iter_records(sources: list[SourceSettings], seed: int = 0, field: str = "data.sources") -> Iterator[dict]:
    """Records from all sources, interleaved at random in proportion to their weights.

    A source that runs out is dropped and the others continue. Record ids are
    ``<source index>:<row index>``, stable across runs.
    """
    rng = random.Random(seed)
    iterators = {}
    for index, source in enumerate(sources):
        iterators[index] = iter(_open_source(source, f"{field}.{index}"))
    row_counts = dict.fromkeys(iterators, 0)
    while iterators:
        live = sorted(iterators)
        index = rng.choices(live, weights=[sources[i].weight for i in live])[0]
        try:
            row = next(iterators[index])
        except StopIteration:
            del iterators[index]
            if row_counts[index] == 0:
                raise DataSourceError(f"{field}.{index}.path: {sources[index].path!r} has no rows") from None
            continue
        except DataSourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - a streamed dataset fails while it is read, in its own types
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise DataSourceError(f"{field}.{index}.path: reading {sources[index].path!r} failed after "
                                  f"{row_counts[index]} rows: {type(exc).__name__}: {first}") from None
        record = _to_record(row, sources[index], f"{index}:{row_counts[index]}", f"{field}.{index}")
        row_counts[index] += 1
        if record is not None:
            yield record
