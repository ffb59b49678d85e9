"""Request traces in Mooncake's format, read strictly: one JSON object a line.

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}

`timestamp` is ms from the trace's start; `hash_ids` holds one id per block of
`tokens_per_block` prompt tokens (512 in Mooncake's traces), chained: the same id
at position i means the same prompt prefix up to and including block i. A line
that breaks the format is an error naming its line and field, never skipped: a
replay of a silently shortened trace would report figures for another trace.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

TOKENS_PER_BLOCK = 512
FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


class TraceError(ValueError):
    """A line that breaks the format: `line` is 1-based, `field` None for the whole line."""

    def __init__(self, line: int, field: str | None, message: str) -> None:
        where = f"line {line}" + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")
        self.line, self.field = line, field


@dataclass(frozen=True, slots=True)
class Request:
    """One validated trace line; `index` is its 0-based position in the trace."""

    index: int
    timestamp: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def block_tokens(self, i: int, tokens_per_block: int = TOKENS_PER_BLOCK) -> int:
        """Prompt tokens in block i: the last block of a prompt may be partial."""
        return min(tokens_per_block, self.input_length - tokens_per_block * i)


def parse_lines(
    lines: Iterable[str], *, tokens_per_block: int = TOKENS_PER_BLOCK, check_chain: bool = True
) -> list[Request]:
    """Validated requests, or TraceError for the first bad line. Required of each line:

    - a JSON object (an empty line is an error; unknown keys are ignored);
    - `timestamp` >= 0, `input_length` >= 1, `output_length` >= 0: JSON integers
      (not floats, strings or booleans); timestamps never decrease;
    - `hash_ids`: a list of ceil(input_length / tokens_per_block) integers >= 0;
    - with `check_chain`, ids consistent with chaining: no id twice in a request, and
      an id always follows the same parent (what a prefix hash guarantees).
    """
    requests: list[Request] = []
    previous = 0
    parents: dict[int, int] = {}  # id -> the id before it (-1: a first block)
    for number, text in enumerate(lines, start=1):
        obj = _object(number, text)
        timestamp = _integer(obj, "timestamp", number, 0)
        if timestamp < previous:
            raise TraceError(
                number, "timestamp", f"time goes backwards: {timestamp} after {previous}"
            )
        previous = timestamp
        length = _integer(obj, "input_length", number, 1)
        output = _integer(obj, "output_length", number, 0)
        ids = _ids(obj, number, -(-length // tokens_per_block), tokens_per_block)
        if check_chain:
            _check_chain(ids, parents, number)
        requests.append(Request(len(requests), timestamp, length, output, ids))
    return requests


def load_trace(
    path: str | Path, *, tokens_per_block: int = TOKENS_PER_BLOCK, check_chain: bool = True
) -> list[Request]:
    with open(path, encoding="utf-8") as f:
        return parse_lines(f, tokens_per_block=tokens_per_block, check_chain=check_chain)


def _object(number: int, text: str) -> dict:
    text = text.rstrip("\r\n")
    if not text.strip():
        raise TraceError(number, None, "empty line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(number, None, f"not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise TraceError(number, None, f"expected a JSON object, got {type(obj).__name__}")
    for name in FIELDS:
        if name not in obj:
            raise TraceError(number, name, "missing")
    return obj


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no number


def _integer(obj: dict, name: str, number: int, minimum: int) -> int:
    value = obj[name]
    if not _is_int(value):
        raise TraceError(number, name, f"expected an integer, got {value!r}")
    if value < minimum:
        raise TraceError(number, name, f"must be >= {minimum}, got {value}")
    return value


def _ids(obj: dict, number: int, expected: int, tokens_per_block: int) -> tuple[int, ...]:
    ids = obj["hash_ids"]
    if not isinstance(ids, list):
        raise TraceError(number, "hash_ids", f"expected a list, got {type(ids).__name__}")
    for pos, value in enumerate(ids):
        if not _is_int(value):
            raise TraceError(number, "hash_ids", f"id {pos} is not an integer: {value!r}")
        if value < 0:
            raise TraceError(number, "hash_ids", f"id {pos} is negative: {value}")
    if len(ids) != expected:
        raise TraceError(
            number,
            "hash_ids",
            f"{len(ids)} ids for input_length {obj['input_length']}: expected "
            f"ceil({obj['input_length']} / {tokens_per_block}) = {expected}",
        )
    return tuple(ids)


def _check_chain(ids: Sequence[int], parents: dict[int, int], number: int) -> None:
    if len(set(ids)) != len(ids):
        raise TraceError(number, "hash_ids", "an id repeats within the request")
    parent = -1
    for pos, block in enumerate(ids):
        seen = parents.setdefault(block, parent)
        if seen != parent:
            raise TraceError(
                number,
                "hash_ids",
                f"id {block} (position {pos}) follows {parent} here and {seen} elsewhere: "
                "the ids are not chained",
            )
        parent = block


def with_shared_prefix(
    requests: Sequence[Request],
    tokens_per_block: int = TOKENS_PER_BLOCK,
    block_id: int | None = None,
) -> list[Request]:
    """The trace behind a shared system prompt: one new block (by default the largest id
    plus one) in front of every request, `input_length` one block longer."""
    if block_id is None:
        block_id = 1 + max((max(r.hash_ids) for r in requests), default=-1)
    return [
        Request(
            r.index,
            r.timestamp,
            r.input_length + tokens_per_block,
            r.output_length,
            (block_id, *r.hash_ids),
        )
        for r in requests
    ]


def distinct_blocks(requests: Sequence[Request]) -> int:
    return len({b for r in requests for b in r.hash_ids})


def total_blocks(requests: Sequence[Request]) -> int:
    return sum(len(r.hash_ids) for r in requests)


def share_of(requests: Sequence[Request], share: float) -> int:
    """Blocks in `share` of the trace's distinct blocks, rounded down (25%: 10,981)."""
    return int(distinct_blocks(requests) * share + 1e-9)
