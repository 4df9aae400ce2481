"""Reading a retrieval corpus in Search-R1's jsonl format, one document per line, streaming.

A line is `{"id": ..., "contents": "\\"Title\\"\\ntext"}` (title in double quotes on the first line of
`contents`) or `{"id": ..., "title": ..., "text": ...}`. Files ending in `.gz` are read through gzip
(Search-R1 ships its Wikipedia dump as `wiki-18.jsonl.gz`).
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

from igpo.types import Doc

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


class CorpusFormatError(ValueError):
    """A corpus line that cannot be read; `path` and `line` (1-based) say where."""

    def __init__(self, path: str | Path, line: int, reason: str) -> None:
        super().__init__(f"{path}: line {line}: {reason}")
        self.path = str(path)
        self.line = line
        self.reason = reason


def parse_contents(contents: str) -> tuple[str, str]:
    """Split Search-R1 `contents` into (title, text): the first line is the title, quotes stripped.

    Without a newline the whole string is the text (title ""), unless it is one quoted title.
    """
    first, newline, rest = contents.partition("\n")
    if not newline:
        stripped = contents.strip()
        if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
            return stripped[1:-1].strip(), ""
        return "", stripped
    title = first.strip()
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1].strip()
    return title, rest.strip()


def _open(path: Path) -> IO[bytes]:
    """Bytes, decoded line by line: an invalid UTF-8 byte is then a bad line with its number."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return path.open("rb")


def _decode(raw: bytes, lineno: int) -> str:
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM may open the file
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start}") from None


def _doc_from_line(line: str) -> Doc:
    """One parsed document; raises ValueError with a short reason when the line is malformed."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    doc_id = obj.get("id", obj.get("_id"))
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or doc_id == "":
        raise ValueError(f"missing or invalid 'id' (got {doc_id!r})")
    if "contents" in obj:
        if not isinstance(obj["contents"], str):
            raise ValueError(f"'contents' must be a string, got {type(obj['contents']).__name__}")
        title, text = parse_contents(obj["contents"])
    elif "text" in obj:
        title, text = obj.get("title", ""), obj["text"]
        if not isinstance(title, str) or not isinstance(text, str):
            raise ValueError("'title' and 'text' must be strings")
    else:
        raise ValueError("missing 'contents' (or 'title'/'text') field")
    return Doc(id=str(doc_id), title=title, text=text)


def iter_corpus(
    path: str | Path, *, on_error: OnError = "raise", errors: list[CorpusFormatError] | None = None
) -> Iterator[Doc]:
    """Stream the documents of a jsonl corpus, skipping blank lines.

    on_error="raise" stops at the first bad line with a `CorpusFormatError` naming file and line;
    "skip" logs a warning, appends the error to `errors` (when given) and goes on.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"iter_corpus: on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield _doc_from_line(_decode(raw, lineno))
            except ValueError as e:
                err = CorpusFormatError(path, lineno, str(e))
                if on_error == "raise":
                    raise err from None
                log.warning("skipping bad corpus line: %s", err)
                if errors is not None:
                    errors.append(err)
