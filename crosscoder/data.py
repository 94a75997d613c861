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


def _jsonl_rows(path: Path, field: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataSourceError(f"{field}.path: {path}:{number} is not valid JSON: {exc.msg}") from None


def _paragraph_rows(path: Path) -> Iterator[dict]:
    """Plain text, one record per blank-line-separated paragraph, streamed."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                lines.append(line)
            elif lines:
                yield {"text": "".join(lines)}
                lines = []
    if lines:
        yield {"text": "".join(lines)}


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
    try:
        if local.suffix in LOCAL_FORMATS:
            if not local.is_file():
                raise DataSourceError(f"{field}.path: no such file {path!r}")
            if local.suffix == ".jsonl":
                return _jsonl_rows(local, field)
            if local.suffix == ".txt":
                return _paragraph_rows(local)
            import datasets

            builder = LOCAL_FORMATS[local.suffix]
            return datasets.load_dataset(builder, data_files=str(local), split="train", streaming=True)
        import datasets

        return datasets.load_dataset(path, source.name, split=source.split, streaming=True)
    except DataSourceError:
        raise
    except Exception as exc:  # datasets raises many types for unreachable or malformed sources
        raise DataSourceError(f"{field}.path: cannot open {path!r}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def _to_record(row: dict, source: SourceSettings, record_id: str, field: str) -> dict | None:
    if source.messages_field:
        if source.messages_field not in row:
            raise DataSourceError(f"{field}.messages_field: rows of {source.path!r} have no column {source.messages_field!r}")
        messages = [
            {"role": str(m["role"]), "content": str(m["content"])}
            for m in row[source.messages_field]
            if m.get("content")
        ]
        if not messages:
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
            continue
        record = _to_record(row, sources[index], f"{index}:{row_counts[index]}", f"{field}.{index}")
        row_counts[index] += 1
        if record is not None:
            yield record
