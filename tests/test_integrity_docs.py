"""docs/integrity.md cannot drift: its worked example is recomputed from the payload text it quotes.

The page is the scheme a third party implements from, so every hash, MAC, length and link it
quotes is checked here against agent/core/chain.py, the example payloads must be exactly what
the agent builds from their parts today, and the verifier sketch it shows is run on them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from agent.core import chain
from agent.core.records import dumps

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrity.md"
TAGGED = re.compile(r"^```(?P<lang>\w+) (?P<tag>[\w-]+)\n(?P<body>.*?)^```", re.S | re.M)
HEX64 = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
QUOTED = re.compile(r"`(hash|mac)`\s*=[^`]*`([0-9a-f]{64})`")


@dataclass(frozen=True)
class Example:
    key: bytes
    payloads: tuple[bytes, ...]
    notes: tuple[str, ...]
    """The prose after each segment's block, up to the next block: what the page says about it."""
    prose: str
    """The page without the quoted payloads."""


@cache
def example() -> Example:
    text = DOC.read_text()
    blocks = {m["tag"]: m for m in TAGGED.finditer(text)}
    key = chain.read_key(blocks["example-key"]["body"].encode())
    segments = sorted((t for t in blocks if t.startswith("segment-")), key=lambda t: int(t.split("-")[1]))
    assert segments == ["segment-0", "segment-1"], segments
    payloads, notes = [], []
    for tag in segments:
        m = blocks[tag]
        body = m["body"]
        assert body.count("\n") == 1 and body.endswith("\n"), f"{tag} must be one line: the exact bytes"
        payloads.append(body.removesuffix("\n").encode())
        nxt = text.find("```", m.end())
        notes.append(text[m.end() : nxt])
    prose = text
    for p in payloads:
        prose = prose.replace(p.decode(), "")
    return Example(key, tuple(payloads), tuple(notes), prose)


def doc_text() -> str:
    return DOC.read_text()


def test_the_example_key_is_as_the_page_describes_it() -> None:
    ex = example()
    assert len(ex.key) >= chain.MAC_KEY_MIN_BYTES
    assert f"{len(ex.key)} ASCII bytes" in doc_text()


def test_every_quoted_hash_and_mac_is_recomputed_from_the_quoted_payloads() -> None:
    ex = example()
    for k, (payload, note) in enumerate(zip(ex.payloads, ex.notes, strict=True)):
        unsigned, mac = chain.split_mac(payload)
        expected = {"hash": chain.digest(payload), "mac": chain.mac_of(unsigned, ex.key)}
        assert mac == expected["mac"], f"segment {k}: its mac member is not the key's HMAC"
        quoted = QUOTED.findall(note)
        assert {name for name, _ in quoted} == {"hash", "mac"}, f"segment {k}: the page must quote both"
        for name, value in quoted:
            assert value == expected[name], (
                f"segment {k}: the page quotes {name} {value}, it is {expected[name]}"
            )
        assert f"{len(payload)} bytes" in doc_text(), f"segment {k} is {len(payload)} bytes"


def test_the_segments_are_linked_from_genesis() -> None:
    ex = example()
    parsed = [chain.parse(p) for p in ex.payloads]
    assert [s.link.i for s in parsed] == [0, 1]
    assert parsed[0].link.prev == chain.GENESIS
    assert parsed[1].link.prev == parsed[0].hash
    assert {s.link.stream for s in parsed} == {"pc-grade-a/data"}
    assert all(chain.mac_ok(p, ex.key) for p in ex.payloads)


def test_no_other_hex_digest_is_quoted_outside_the_payloads() -> None:
    """A hash the page quotes in prose is one of the example's, or GENESIS: nothing stale."""
    ex = example()
    known = {chain.GENESIS}
    for p in ex.payloads:
        known |= {chain.digest(p), chain.split_mac(p)[1] or ""}
    stray = set(HEX64.findall(ex.prose)) - known
    assert not stray, f"digests quoted in docs/integrity.md that the example does not produce: {stray}"


def test_the_example_is_what_the_agent_builds_from_its_parts() -> None:
    """Not only self-consistent: byte for byte what chain.build_payload makes today, so the
    page's layout (member order, the mac's place, compact JSON) is the code's."""
    ex = example()
    for p in ex.payloads:
        doc: dict[str, Any] = json.loads(p)
        assert list(doc) == ["schema", "agent", "device", "source", "clock", "chain", "blocks", "mac"]
        rebuilt = chain.build_payload(
            kind="data",
            agent=doc["agent"],
            device=doc["device"],
            stream=doc["chain"]["stream"],
            i=doc["chain"]["i"],
            prev=doc["chain"]["prev"],
            source=doc["source"],
            clock=doc["clock"],
            bodies=[dumps(b) for b in doc["blocks"]],
            key=ex.key,
        )
        assert rebuilt == p
        assert doc["schema"] == chain.SCHEMAS["data"]


def test_the_page_states_the_layout_in_the_codes_order() -> None:
    layout = re.search(r"```text\n(\{\"schema\".*?)```", doc_text(), re.S)
    assert layout is not None
    members = re.findall(r'^[ {]"(\w+)":', layout.group(1), re.M)
    assert members == ["schema", "agent", "device", "source", "clock", "chain", "blocks", "mac"]


def test_the_mac_tail_is_as_long_as_the_page_says() -> None:
    ex = example()
    unsigned, _ = chain.split_mac(ex.payloads[0])
    tail = len(ex.payloads[0]) - len(unsigned) + 1  # the unsigned payload keeps its final "}"
    assert tail == 74
    assert f"exactly the {tail} bytes" in doc_text()


def test_the_seqs_the_page_names_are_the_blocks() -> None:
    ex = example()
    m = re.search(r"Readings (\d+) and (\d+) are in segment 0, (\d+) and (\d+) here", doc_text())
    assert m is not None
    named = [int(x) for x in m.groups()]
    seqs: list[int] = []
    for p in ex.payloads:
        for block in json.loads(p)["blocks"]:
            seqs += range(block["seq"], block["seq"] + block["n"])
    assert seqs == named


# --------------------------------------------------------------------------- the verifier sketch


@cache
def sketch() -> Any:
    m = re.search(r"```python\n(.*?)```", doc_text(), re.S)
    assert m is not None, "docs/integrity.md shows a verifier sketch"
    namespace: dict[str, Any] = {}
    exec(compile(m.group(1), str(DOC), "exec"), namespace)
    return namespace["check_stream"]


def test_the_sketch_accepts_the_example_with_and_without_the_key() -> None:
    ex = example()
    assert sketch()(list(ex.payloads), ex.key) == []
    assert sketch()(list(ex.payloads)) == []


def _altered(ps: list[bytes]) -> list[bytes]:
    """A value changed in segment 0 (a 14 particles count made 15)."""
    return [ps[0].replace(b'"values":[14,0]', b'"values":[15,0]'), *ps[1:]]


@pytest.mark.parametrize(
    ("tamper", "findings"),
    [
        (_altered, ["i=0: bad mac", "i=1: prev does not match the hash of i=0"]),
        (lambda ps: [ps[1], ps[0]], ["i=1 is followed by i=0"]),
        (lambda ps: [ps[0], ps[0], ps[1]], ["i=0 is followed by i=0"]),
        (
            lambda ps: [chain.split_mac(ps[0])[0], ps[1]],
            ["i=0: no mac", "i=1: prev does not match the hash of i=0"],
        ),
        (lambda ps: ps[1:], []),  # a capture that begins mid-stream cannot check the first link
    ],
    ids=["altered", "swapped", "replayed", "mac-stripped", "begins-mid-stream"],
)
def test_the_sketch_finds_tampering(
    tamper: Callable[[list[bytes]], list[bytes]], findings: list[str]
) -> None:
    ex = example()
    assert sketch()(tamper(list(ex.payloads)), ex.key) == findings


def test_the_sketch_recovers_the_unsigned_payload_as_the_agent_does() -> None:
    """The page's byte arithmetic (the last 74 bytes) is chain.split_mac's."""
    ex = example()
    for p in ex.payloads:
        assert p[:-74] + b"}" == chain.split_mac(p)[0]


# --------------------------------------------------------------------------- the rules the page states

OPERATIONS = DOC.parent / "operations.md"


def test_the_key_id_the_page_quotes_is_the_example_keys() -> None:
    m = re.search(r"the example key below has key id\s+`([0-9a-f]{16})`", doc_text())
    assert m is not None, "docs/integrity.md names the example key's id"
    assert m.group(1) == chain.key_id(example().key)
    assert '"cleanroom-edge/key-id\\n" + key' in doc_text(), "the page states how a key id is made"
    assert chain.key_id(example().key) == chain.digest(b"cleanroom-edge/key-id\n" + example().key)[:16]


def test_the_key_change_record_is_named_as_the_verifier_reads_it() -> None:
    from agent.buffer.audit import CORE_KEYS
    from agent.integrity.verify import KEY_CHANGE

    block = re.search(r'```text\n(\{"action":"integrity_key_change".*?)```', doc_text(), re.S)
    assert block is not None and KEY_CHANGE == "integrity_key_change"
    named = set(re.findall(r'"(\w+)":', block.group(1)))
    assert named == (CORE_KEYS - {"device"}) | {"signed_from"}


def test_the_time_gap_rule_is_the_verifiers() -> None:
    from agent.integrity.verify import TIME_GAP_FACTOR, TIME_GAP_MIN_NS

    m = re.search(r"longer than \*\*(\d+) × the median step and longer than (\d+) s\*\*", doc_text())
    assert m is not None, "docs/integrity.md states the time-gap rule"
    assert (float(m.group(1)), int(m.group(2)) * 10**9) == (TIME_GAP_FACTOR, TIME_GAP_MIN_NS)


def test_every_finding_the_verifiers_report_is_explained() -> None:
    from typing import get_args

    from agent.buffer.verify import BreakKind as BufferBreak
    from agent.integrity.verify import BreakKind as CaptureBreak

    text = doc_text()
    table = text[text.index("| Finding | Means |") : text.index("`verify --buffer` reports")]
    rows = {m for cell in re.findall(r"^\| ([^|]+) \|", table, re.M) for m in re.findall(r"`(\w+)`", cell)}
    assert set(get_args(CaptureBreak)) <= rows, set(get_args(CaptureBreak)) - rows
    assert rows - set(get_args(CaptureBreak)) == {"UNEXPLAINED", "REPLAYED"}
    buffer_part = text[text.index("`verify --buffer` reports") : text.index("| Exit code |")]
    assert {str(k) for k in BufferBreak} == set(re.findall(r"`(\w+)`", buffer_part)) - {
        "chain_gaps",
        "chain",
        "i",
    }


def test_the_operators_triage_table_names_real_findings() -> None:
    """What the operator looks up in operations.md is what the text report prints (capitals)."""
    from typing import get_args

    from agent.integrity.verify import BreakKind as CaptureBreak

    text = OPERATIONS.read_text()
    table = text[text.index("| Finding | Look at | Usual cause |") : text.index('Never "fix" a finding')]
    named = {m for cell in re.findall(r"^\| ([^|]+) \|", table, re.M) for m in re.findall(r"`(\w+)`", cell)}
    printed = {k.upper() for k in get_args(CaptureBreak)} | {"UNEXPLAINED", "REPLAYED"}
    assert named - {"seqs", "segments", "time"} <= printed, named - printed
    assert {k.upper() for k in get_args(CaptureBreak)} - {"EMPTY"} <= named


def test_both_pages_quote_the_same_open_time_cost() -> None:
    for page in (doc_text(), OPERATIONS.read_text()):
        assert re.search(r"0\.25 s per 100 MB", page) and "0.62 s" in page
