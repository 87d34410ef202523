"""Find a source's files (local paths, globs or URIs) and parse their bytes into records.

Parsing is pure: `parse_file(path, data, source)` turns one file's bytes (`parse_line` one JSONL line) into
documents and bad records, each bad record naming its file and line (or row) and why it was rejected.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from raylong.config import SourceConfig, expand_path
from raylong.storage import fs_path


@dataclass
class Record:
    """One document (pretrain: `text`; SFT: `messages`) with where it came from."""

    source: str
    origin: str  # "file:line" or "file#row"
    text: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass
class BadRecord:
    source: str
    origin: str
    reason: str


@dataclass
class ParsedFile:
    records: list[Record] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for a recipe path or URI (file://, s3://, gs://), ${VARS} expanded."""
    return fs_path(expand_path(uri))


@dataclass(frozen=True)
class SourceFile:
    """One input file as its listing described it (no second metadata request per file on object stores)."""

    path: str  # URIs keep their scheme
    size: int
    mtime_ns: int | None


def resolve_files(path: str, fmt: str) -> list[str]:
    """Expand a file, directory or glob into a sorted list of files (URIs keep their scheme)."""
    return [f.path for f in resolve_source_files(path, fmt)]


def resolve_source_files(path: str, fmt: str) -> list[SourceFile]:
    """`resolve_files` with each file's size and modification time, from the one listing or lookup."""
    path = expand_path(path)
    scheme = path.split("://", 1)[0] + "://" if "://" in path else ""
    fs, local = filesystem_and_path(path)
    pattern = None
    if any(ch in local for ch in "*?["):
        # split at the first wildcard component
        parts = local.split("/")
        first = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
        base = "/".join(parts[:first]) or "/"
        pattern = local
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    else:
        info = fs.get_file_info(local)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"data source path does not exist: {path}")
        if info.type == pafs.FileType.File:
            return [SourceFile(path, info.size or 0, info.mtime_ns)]
        selector = pafs.FileSelector(local, recursive=True)
    files = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        if pattern is not None and not _glob_match(info.path, pattern):
            continue
        if pattern is None and fmt == "parquet" and not info.path.endswith(".parquet"):
            continue
        files.append(SourceFile(scheme + info.path if scheme and scheme != "file://" else info.path, info.size or 0,
                                info.mtime_ns))
    return sorted(files, key=lambda f: f.path)


def _glob_match(path: str, pattern: str) -> bool:
    """Shell-style glob: `*` and `?` stay inside one directory, `**/` spans any number of them."""
    return re.fullmatch(_glob_regex(pattern), path) is not None


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(pattern[i]))
                i += 1
            else:
                out.append("[" + pattern[i + 1 : end].replace("!", "^", 1) + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def decompress(path: str, data: bytes) -> bytes:
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return data


def parse_file(path: str, data: bytes, source: SourceConfig, sft: bool) -> ParsedFile:
    """Parse one file of a text or JSONL source. Never raises on bad content: it reports it."""
    try:
        data = decompress(path, data)
    except Exception as exc:  # corrupt archive
        return ParsedFile(bad=[BadRecord(source.name, path, f"cannot decompress: {exc}")])
    if source.format == "text":
        return parse_text(path, data, source)
    out = ParsedFile()
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            parse_line(raw, f"{path}:{lineno}", source, sft, out)
    return out


def parse_text(path: str, data: bytes, source: SourceConfig) -> ParsedFile:
    """A text source's file: one document."""
    out = ParsedFile()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        out.bad.append(BadRecord(source.name, path, f"invalid UTF-8 at byte {exc.start}"))
        return out
    if not text.strip():
        out.bad.append(BadRecord(source.name, path, "empty document"))
    else:
        out.records.append(Record(source.name, path, text=text))
    return out


def parse_line(raw: bytes, origin: str, source: SourceConfig, sft: bool, out: ParsedFile) -> None:
    """One JSONL line into `out`: a record, or a bad record saying why."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        out.bad.append(BadRecord(source.name, origin, f"invalid UTF-8 at byte {exc.start}"))
        return
    except json.JSONDecodeError as exc:
        out.bad.append(BadRecord(source.name, origin, f"malformed JSON: {exc.msg}"))
        return
    record, reason = record_from_object(obj, source, origin, sft)
    if record is None:
        out.bad.append(BadRecord(source.name, origin, reason))
    else:
        out.records.append(record)


def record_from_object(obj: Any, source: SourceConfig, origin: str, sft: bool) -> tuple[Record | None, str]:
    """Validate one JSON object / Parquet row; returns (record, "") or (None, reason)."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if sft:
        messages = obj.get(source.messages_field)
        if not isinstance(messages, list) or not messages:
            return None, f"missing or empty {source.messages_field!r} list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system",
                "user",
                "assistant",
            ):
                return None, f"{source.messages_field}[{i}] must be {{role: system|user|assistant, content: str}}"
        if not any(m["role"] == "assistant" for m in messages):
            return None, "conversation has no assistant message (nothing to learn)"
        return Record(source.name, origin, messages=messages), ""
    if source.text_field not in obj:
        return None, f"missing field {source.text_field!r}"
    text = obj[source.text_field]
    if not isinstance(text, str):
        return None, f"field {source.text_field!r} is {type(text).__name__}, not a string"
    if not text.strip():
        return None, "empty document"
    return Record(source.name, origin, text=text), ""
