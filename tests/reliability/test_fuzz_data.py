"""Data rows fuzzed: malformed JSON, null bytes, wrong types, giant strings, empty files, invalid
UTF-8, lone surrogates. Reading never raises anything but DataError, and every row is accounted
for (accepted + rejected == rows read, each reject with a known reason); a full `sftc compile`
of such data either writes a complete bundle that lists every reject or exits 2 with "error:",
no traceback, and no partial bundle or temp dir.

Found by these tests and fixed in compiler/data.py: a 5000-digit integer made json.loads raise
ValueError (a traceback instead of a reject), a deeply nested .json file a RecursionError, and a
"\\ud800" escape (valid JSON, not text) crashed the tokenizer with TypeError mid-compile.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftc.compiler.data import read_data
from sftc.compiler.spec import parse_spec
from sftc.cli import main
from sftc.errors import DataError

from tests.compiler.conftest import base_spec, read_jsonl
from tests.conftest import without_progress

EXAMPLES = int(os.environ.get("SFTC_FUZZ_EXAMPLES", "1"))  # scripts/reliability_report.py --fuzz-scale
SETTINGS = settings(max_examples=200 * EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
REASONS = {"missing_field", "wrong_type", "empty_completion", "empty_prompt", "malformed_json", "bad_encoding",
           "duplicate", "not_an_object", "bad_role", "ends_without_answer", "empty_text", "no_turns"}
DATA_SPECS = {fmt: parse_spec(base_spec(data={"format": fmt}, **({"objective": "continued_pretraining"} if fmt == "text" else {})), "s").data
              for fmt in ("prompt_completion", "conversational", "text")}
# ShareGPT/FastChat rows through the declarative role/field mapping (docs/data-formats.md)
DATA_SPECS["sharegpt"] = parse_spec(base_spec(data={"format": "conversational", "fields": {
    "messages": "conversations", "role": "from", "content": "value", "group": "id",
    "roles": {"human": "user", "gpt": "assistant", "system": "system"}}}), "s").data
# OASST/Guanaco transcripts cut into turns at declared markers
DATA_SPECS["transcript"] = parse_spec(base_spec(data={"format": "prompt_completion", "fields": {
    "prompt": "input", "completion": "output", "group": "id",
    "turn_markers": {"### Human:": "user", "### Assistant:": "assistant"}}}), "s").data

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=10,
)
field_values = st.one_of(st.text(max_size=60), json_values, st.just(""), st.just("   "))
rowish = st.fixed_dictionaries(
    {},
    optional={"thread_id": field_values, "prompt": field_values, "completion": field_values, "text": field_values,
              "messages": st.one_of(json_values, st.lists(st.fixed_dictionaries(
                  {"role": st.sampled_from(["user", "assistant", "system", "robot"]), "content": field_values}),
                  max_size=3)),
              "id": field_values,
              "input": st.one_of(field_values, st.lists(st.sampled_from(
                  ["### Human:", "### Assistant:", " hi ", "", "\n", "### Human", "###"]), max_size=6).map("".join)),
              "output": field_values,
              "conversations": st.one_of(json_values, st.lists(st.fixed_dictionaries(
                  {"from": st.one_of(st.sampled_from(["human", "gpt", "system", "bot"]), json_values),
                   "value": field_values}), max_size=4)),
              "extra": json_values},
)


def _line(obj) -> bytes:
    return json.dumps(obj).encode()


lines = st.one_of(
    rowish.map(_line),
    st.builds(lambda i: _line({"thread_id": f"T{i}", "prompt": f"p {i}", "completion": f"c {i}"}), st.integers(0, 5)),
    st.binary(max_size=80),  # random bytes: invalid UTF-8, stray newlines, NULs
    st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),  # lone surrogates as raw bytes
    st.sampled_from([
        b"{", b"[1, 2", b"null", b"42", b'"just a string"', b"\x00\x00", b'{"prompt": "a\x00b"}',
        b'{"thread_id": "T1", "prompt": "\\ud800", "completion": "x"}',  # lone surrogate escape
        b'{"thread_id": "T1", "prompt": "p", "completion": "\\udfff tail"}',
        b'{"thread_id": ' + b"9" * 5000 + b', "prompt": "p", "completion": "c"}',  # over the int digit limit
        b"[" * 100_000,  # deeper than json's recursion limit
        b"\xef\xbb\xbf{}",  # a BOM mid-file
        "{\"thread_id\": \"T1\", \"prompt\": \"caf\u00e9\", \"completion\": \"ok\"}".encode("latin-1"),  # mixed encodings
        b'{"thread_id": "T1", "prompt": "' + b"x" * 200_000 + b'", "completion": "y"}',  # giant string
        b'{"thread_id": true, "prompt": "p", "completion": "c"}',
    ]),
)


def _rows_in(data: bytes) -> int:
    """What the reader counts as a row: a non-blank line. Binary file iteration splits on b"\\n"
    only (not on \\r or the other separators str.splitlines knows), so the count does too."""
    return sum(1 for raw in data.split(b"\n") if raw.strip())


def _check(result, data: bytes, display: str):
    read = _rows_in(data)
    assert result.rows_read == read == len(result.examples) + len(result.rejects)
    assert result.files[0]["rows_read"] == read
    assert result.files[0]["accepted"] == len(result.examples)
    assert sum(result.files[0]["rejected"].values()) == len(result.rejects)
    assert {r.reason for r in result.rejects} <= REASONS, {r.reason for r in result.rejects}
    numbers = sorted([r.row for r in result.rejects] + [e.row for e in result.examples])
    assert numbers == list(range(read)), "every row number exactly once"
    for reject in result.rejects:
        assert reject.file == display
        json.dumps(reject.as_dict(), ensure_ascii=False).encode("utf-8")  # rejects.jsonl can hold it
    for example in result.examples:
        for message in example.messages or []:
            message["content"].encode("utf-8")  # the tokenizer and the bundle can take it


@SETTINGS
@given(body=st.lists(lines, max_size=12), fmt=st.sampled_from(sorted(DATA_SPECS)), blank=st.booleans())
def test_jsonl_rows_are_all_accounted_for(tmp_path, body, fmt, blank, figures):
    # random bytes may hold their own newlines: those make extra rows, which must be counted too
    data = (b"\n\n" if blank else b"").join(line + b"\n" for line in body)
    path = tmp_path / "rows.jsonl"
    path.write_bytes(data)
    figures["inputs_tried"] += 1
    figures["inputs_tried_data"] += 1
    result = read_data([(path, "data/rows.jsonl")], DATA_SPECS[fmt])
    _check(result, data, "data/rows.jsonl")


@SETTINGS
@given(payload=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                         st.lists(rowish).map(lambda v: json.dumps(v).encode()),
                         st.sampled_from([b"[" * 100_000, b"[" + b"9" * 5000 + b"]", b"", b"[]"])))
def test_json_files_give_rows_or_a_data_error(tmp_path, payload, figures):
    path = tmp_path / "rows.json"
    path.write_bytes(payload)
    figures["inputs_tried"] += 1
    figures["inputs_tried_data"] += 1
    try:
        result = read_data([(path, "data/rows.json")], DATA_SPECS["prompt_completion"])
    except DataError as exc:
        assert "data/rows.json" in str(exc)
        return
    assert result.rows_read == len(json.loads(payload)) == len(result.examples) + len(result.rejects)


def test_empty_file_reads_zero_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"")
    result = read_data([(path, "data/rows.jsonl")], DATA_SPECS["prompt_completion"])
    assert result.rows_read == 0 and result.files[0]["rows_read"] == 0


# --- through a full `sftc compile` -------------------------------------------------------------


GOOD = [{"thread_id": f"T{i}", "prompt": f"Key number {i} is stale.", "completion": f"Rotate key {i}."} for i in range(12)]
NASTY = [
    b"{not json",
    b'{"thread_id": "T90", "prompt": "a\\u0000b", "completion": "nul inside is text"}',
    b'{"thread_id": "T91", "prompt": "\\ud800", "completion": "lone surrogate"}',
    b"\xff\xfe\x00broken utf-8",
    '{"thread_id": "T92", "prompt": "caf\u00e9", "completion": "latin-1 line"}'.encode("latin-1"),
    b'{"thread_id": "T93", "prompt": ["wrong", "type"], "completion": "x"}',
    b'{"thread_id": ' + b"7" * 5000 + b', "prompt": "p", "completion": "c"}',
    b'{"thread_id": "T94", "prompt": "' + b"long " * 20_000 + b'", "completion": "giant prompt"}',
    b'{"thread_id": "T95", "prompt": "p", "completion": "' + b"answer " * 20_000 + b'"}',
    b"[" * 50_000,
    b"42",
]


def _assert_no_partial(project):
    bundles = project.root / "bundles"
    assert not bundles.exists() or all(not p.name.startswith(".") for p in bundles.iterdir()), "staging dir left"
    assert not list(project.root.rglob("*.tmp"))


def test_compile_of_nasty_rows_accounts_for_every_row(cproject, figures):
    project = cproject
    data = b"".join(json.dumps(r).encode() + b"\n" for r in GOOD) + b"".join(line + b"\n" for line in NASTY)
    (project.root / "data").mkdir()
    (project.root / "data" / "rows.jsonl").write_bytes(data)
    spec = project.write_spec(base_spec(data={"max_reject_fraction": 0.6}))
    figures["inputs_tried"] += 1
    figures["inputs_tried_compile"] += 1
    result = CliRunner().invoke(main, ["compile", str(spec)])
    figures["tracebacks"] += int(result.exception is not None and not isinstance(result.exception, SystemExit))
    assert result.exit_code == 0, result.output
    bundle = project.root / "bundles" / re.search(r"compiled: .*/(t-[0-9a-f]{12})", result.output).group(1)
    lock = json.loads((bundle / "bundle.lock.json").read_text())
    manifest = lock["data_manifest"]
    rejects = read_jsonl(bundle / "rejects.jsonl")
    assert manifest["rows_read"] == len(GOOD) + len(NASTY)
    assert manifest["train_examples"] + manifest["eval_examples"] + len(rejects) == manifest["rows_read"]
    by_row = {r["line"] - 1: r["reason"] for r in rejects}  # rejects.jsonl: 1-based lines; this file has no blank one
    n = len(GOOD)
    assert by_row[n + 0] == "malformed_json"
    assert n + 1 not in by_row  # a NUL inside a JSON string is text, and trains
    assert by_row[n + 2] == "bad_encoding"  # lone surrogate: a reject, not a TypeError in the tokenizer
    assert by_row[n + 3] == by_row[n + 4] == "bad_encoding"
    assert by_row[n + 5] == "wrong_type"
    assert by_row[n + 6] == "malformed_json"  # over the int digit limit
    assert by_row[n + 7] == by_row[n + 8] == "answer_truncated"
    assert by_row[n + 9] == "malformed_json" and by_row[n + 10] == "not_an_object"
    _assert_no_partial(project)


@pytest.mark.parametrize("name,payload,needle", [
    ("rows.jsonl", b"", "no row was accepted"),
    ("rows.jsonl", b"\xff\xfe" * 50 + b"\n" + b"\x80\n", "no row was accepted"),
    ("rows.jsonl", b"{not json\n" * 3 + json.dumps(GOOD[0]).encode() + b"\n", "data.max_reject_fraction"),
    ("rows.json", b"[" * 100_000, "nested too deeply"),
    ("rows.json", b'{"not": "a list"}', "must hold a list"),
    ("rows.parquet", b"PAR1 this is not parquet", "cannot read parquet"),
], ids=["empty", "all-invalid-utf8", "mostly-malformed", "deep-json", "json-object", "corrupt-parquet"])
def test_compile_of_unusable_data_fails_cleanly(cproject, name, payload, needle, figures):
    project = cproject
    (project.root / "data").mkdir()
    (project.root / "data" / name).write_bytes(payload)
    spec = project.write_spec(base_spec(data={"files": [f"data/{name}"], "max_reject_fraction": 0.5}))
    figures["inputs_tried"] += 1
    figures["inputs_tried_compile"] += 1
    result = CliRunner().invoke(main, ["compile", str(spec)])
    figures["tracebacks"] += int(result.exception is not None and not isinstance(result.exception, SystemExit))
    assert result.exit_code == 2, result.output
    assert without_progress(result.output).startswith("error:") and "Traceback" not in result.output
    assert needle in result.output, result.output
    if payload:  # an empty file has no row to name; every other case names the file
        assert f"data/{name}" in result.output, result.output
    _assert_no_partial(project)
    assert not (project.root / "bundles").exists() or not list((project.root / "bundles").iterdir())
