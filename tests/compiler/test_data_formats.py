"""Data as it ships: ShareGPT/FastChat and OASST-style rows through a declared field map,
weighted `data.sources`, and a Hugging Face `datasets` dataset saved with save_to_disk. The rows
are the real files under ../shared/external/datasets, compiled for real."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter

import pytest

from sftc.errors import DataError, SpecError

from .conftest import base_spec, external_path, load_tokens, read_jsonl, segments

SHAREGPT_FIELDS = {"messages": "conversations", "role": "from", "content": "value", "group": "id",
                   "roles": {"human": "user", "gpt": "assistant", "system": "system"}}
OASST_FIELDS = {"prompt": "input", "completion": "output", "group": "parent_id",
                "turn_markers": {"### Human:": "user", "### Assistant:": "assistant"}}


@pytest.fixture
def sharegpt(project) -> str:
    source = external_path("datasets", "fastchat-multiturn", "dummy_conversation.json")
    (project.root / "data").mkdir(exist_ok=True)
    shutil.copyfile(source, project.root / "data/sharegpt.json")
    return "data/sharegpt.json"


@pytest.fixture
def oasst(project) -> str:
    source = external_path("datasets", "oasst-multiturn", "gpt-3.5-oa-generations.jsonl")
    (project.root / "data").mkdir(exist_ok=True)
    shutil.copyfile(source, project.root / "data/oasst.jsonl")
    return "data/oasst.jsonl"


def _spec(data: dict, **overrides) -> dict:
    spec = base_spec(data={"max_reject_fraction": 1.0, **data}, tokenize={"max_length": 4096},
                     packing={"seq_length": 4096}, split={"eval_fraction": 0.1}, **overrides)
    if "sources" in data:
        del spec["data"]["files"]
    return spec


def _compile(project, spec, **kwargs):
    """(bundle, bundle.lock.json as JSON): these tests check the bytes a reader gets, not the in-memory
    Lock model, so they keep testing the data layer while that model changes."""
    bundle, _, _ = project.compile(spec, **kwargs)
    return bundle, json.loads((bundle / "bundle.lock.json").read_text())


def _decoded_supervised(project, bundle) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(project.root / "model"))
    return [tokenizer.decode([int(t) for t, label in zip(ids, labels) if label != -100])
            for _, ids, labels in segments(load_tokens(bundle))]


def test_sharegpt_rows_compile_through_the_role_map(project, sharegpt):
    spec = _spec({"files": [sharegpt], "format": "conversational", "fields": SHAREGPT_FIELDS})
    bundle, lock = _compile(project, spec)
    manifest = lock["data_manifest"]
    assert manifest["rows_read"] == 500 and manifest["rejected"] == {}
    assert manifest["train_examples"] + manifest["eval_examples"] == 500
    rows = json.loads((project.root / sharegpt).read_text())
    answers = {turn["value"] for row in rows for turn in row["conversations"] if turn["from"] == "gpt"}
    questions = {turn["value"] for row in rows for turn in row["conversations"] if turn["from"] == "human"}
    supervised = "\n".join(_decoded_supervised(project, bundle))
    # every gpt turn of the train side is supervised, no human turn is
    train_ids = {r["id"] for r in rows} & set(lock["split"]["train_groups"])
    train_answers = {t["value"] for r in rows if r["id"] in train_ids for t in r["conversations"] if t["from"] == "gpt"}
    assert train_answers <= answers and all(a in supervised for a in train_answers)
    asked_only = [q for q in questions if not any(q in a for a in answers)]  # 'Goodbye' is inside an answer
    assert asked_only and not any(q in supervised for q in asked_only)


def test_sharegpt_without_the_map_says_what_the_rows_hold(project, sharegpt):
    from sftc.compiler.data import read_data
    from sftc.compiler.spec import parse_spec

    spec = parse_spec(_spec({"files": [sharegpt], "format": "conversational", "fields": {"group": "id"}}))
    result = read_data([(project.root / sharegpt, sharegpt)], spec.data)
    assert not result.examples
    assert {r.reason for r in result.rejects} == {"missing_field"}
    assert result.rejects[0].detail == "missing ['messages']; the row has: conversations, id"

    mapped_fields_only = dict(SHAREGPT_FIELDS, roles=None, role=None, content=None)
    spec = parse_spec(_spec({"files": [sharegpt], "format": "conversational", "fields": mapped_fields_only}))
    result = read_data([(project.root / sharegpt, sharegpt)], spec.data)
    assert {r.reason for r in result.rejects} == {"wrong_type"}
    assert "must be an object with role and content" in result.rejects[0].detail


def test_sharegpt_unknown_speaker_is_a_bad_role_naming_the_map(project):
    from sftc.compiler.data import read_data
    from sftc.compiler.spec import parse_spec

    project.write_jsonl("data/rows.jsonl", [
        {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "bing", "value": "yo"}]},
    ])
    spec = parse_spec(_spec({"files": ["data/rows.jsonl"], "format": "conversational", "fields": SHAREGPT_FIELDS}))
    (reject,) = read_data([(project.root / "data/rows.jsonl", "data/rows.jsonl")], spec.data).rejects
    assert reject.reason == "bad_role"
    assert "conversations[1].from is 'bing'" in reject.detail and "'gpt'" in reject.detail


def test_oasst_transcripts_split_into_the_turns_they_hold(project, oasst):
    """SOURCE.txt counts human turns per row (1: 517, 2: 414, 3: 22); with the answer each row
    becomes 2, 4 or 6 messages ending in the row's output."""
    from sftc.compiler.data import read_data
    from sftc.compiler.spec import parse_spec

    spec = parse_spec(_spec({"files": [oasst], "format": "prompt_completion", "fields": OASST_FIELDS}))
    result = read_data([(project.root / oasst, oasst)], spec.data)
    assert result.rows_read == 953 and not result.rejects
    assert Counter(len(e.messages) for e in result.examples) == {2: 517, 4: 414, 6: 22}
    for example in result.examples:
        assert [m["role"] for m in example.messages] == ["user", "assistant"] * (len(example.messages) // 2)
        assert example.messages[-1]["content"] == example.fields["output"]
        assert "### " not in example.messages[0]["content"]

    bundle, lock = _compile(project, _spec({"files": [oasst], "format": "prompt_completion", "fields": OASST_FIELDS}))
    assert lock["data_manifest"]["rows_read"] == 953
    prompts = read_jsonl(bundle / "eval_prompts.jsonl")
    assert prompts and all(p["reference"] == p["fields"]["output"] for p in prompts)


def test_transcript_with_text_before_the_first_marker_is_rejected(project):
    from sftc.compiler.data import read_data
    from sftc.compiler.spec import parse_spec

    project.write_jsonl("data/rows.jsonl", [
        {"parent_id": "a", "input": "A chat. ### Human: hi ### Assistant:", "output": "hello"},
        {"parent_id": "b", "input": "no markers at all", "output": "hello"},
        {"parent_id": "c", "input": "### Human:   ### Assistant:", "output": "hello"},
    ])
    spec = parse_spec(_spec({"files": ["data/rows.jsonl"], "format": "prompt_completion", "fields": OASST_FIELDS}))
    rejects = read_data([(project.root / "data/rows.jsonl", "data/rows.jsonl")], spec.data).rejects
    assert [(r.row, r.reason) for r in rejects] == [(0, "no_turns"), (1, "no_turns"), (2, "empty_prompt")]
    assert [r.where for r in rejects] == ["data/rows.jsonl:1", "data/rows.jsonl:2", "data/rows.jsonl:3"]  # 1-based lines


def _save_dataset(project, rows, rel="data/sharegpt_ds"):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(project.root / rel))
    return rel


def _mixture(dataset_rel: str, oasst: str, weights=(2.0, 0.5)) -> dict:
    return _spec({
        "format": "conversational", "fields": SHAREGPT_FIELDS,
        "sources": [
            {"dataset": dataset_rel, "weight": weights[0]},
            {"files": [oasst], "weight": weights[1], "format": "prompt_completion", "fields": OASST_FIELDS},
        ],
    })


def test_weighted_sources_and_a_saved_dataset(project, sharegpt, oasst, tmp_path):
    rows = json.loads((project.root / sharegpt).read_text())
    dataset = _save_dataset(project, rows)
    bundle, lock = _compile(project, _mixture(dataset, oasst))
    manifest = lock["data_manifest"]
    ds_entry, oasst_entry = manifest["files"]
    assert ds_entry["path"] == dataset and ds_entry["rows_read"] == 500 and ds_entry["source"] == 0
    assert ds_entry["fingerprint"] and len(ds_entry["sha256"]) == 64
    assert oasst_entry["source"] == 1 and oasst_entry["format"] == "prompt_completion"
    first, second = manifest["sources"]
    assert first["used"] == 2 * first["train_examples"]
    assert second["used"] == math.floor(0.5 * second["train_examples"] + 0.5)  # half rounds up
    assert lock["packing"]["examples"] == first["used"] + second["used"]
    # eval is never reweighted: every accepted eval row appears once
    assert manifest["eval_examples"] == len(read_jsonl(bundle / "eval_prompts.jsonl"))

    # same spec and rows in a copy of the project elsewhere: same mixture, same bytes
    from .conftest import Project

    elsewhere = Project(tmp_path / "elsewhere")
    shutil.copytree(project.root, elsewhere.root, ignore=shutil.ignore_patterns("bundles"))
    again, lock2 = _compile(elsewhere, _mixture(dataset, oasst))
    assert lock2["bundle_id"] == lock["bundle_id"]
    assert (again / "train.safetensors").read_bytes() == (bundle / "train.safetensors").read_bytes()

    # the dataset's rows are part of the bundle hash, like a file's bytes, and a run re-checks them
    from sftc.runtime.bundle import load_bundle
    from sftc.runtime.verify import _check_data

    problems = []
    _check_data(load_bundle(bundle), problems)
    assert problems == []
    shutil.rmtree(project.root / dataset)
    rows[0]["conversations"][1]["value"] = "A different first answer."
    _save_dataset(project, rows)
    _check_data(load_bundle(bundle), problems)
    assert len(problems) == 1 and "input dataset changed since compile" in problems[0]
    _, lock3 = _compile(project, _mixture(dataset, oasst))
    assert lock3["bundle_id"] != lock["bundle_id"]
    assert lock3["data_manifest"]["hash"] != manifest["hash"]


def test_downweighting_keeps_a_seeded_subset(project, sharegpt, oasst):
    dataset = _save_dataset(project, json.loads((project.root / sharegpt).read_text()))
    _, lock = _compile(project, _mixture(dataset, oasst, weights=(0.25, 1.0)))
    first, second = lock["data_manifest"]["sources"]
    assert first["used"] == math.floor(0.25 * first["train_examples"] + 0.5) and second["used"] == second["train_examples"]


def test_dataset_dict_needs_a_known_split(project):
    datasets = pytest.importorskip("datasets")
    rows = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(8)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(project.root / "data/dd"))
    spec = _spec({"format": "conversational", "fields": SHAREGPT_FIELDS, "sources": [{"dataset": "data/dd"}]})
    with pytest.raises(DataError, match=r"data.sources\[0\].split: data/dd holds splits \['test', 'train'\]; no split given"):
        project.compile(spec)
    spec["data"]["sources"][0]["split"] = "train"
    _, lock = _compile(project, spec)
    assert lock["data_manifest"]["files"][0]["split"] == "train" and lock["data_manifest"]["rows_read"] == 8


def test_a_directory_that_is_not_a_saved_dataset_is_refused(project):
    (project.root / "data/plain").mkdir(parents=True)
    spec = _spec({"format": "conversational", "fields": SHAREGPT_FIELDS, "sources": [{"dataset": "data/plain"}]})
    with pytest.raises(Exception, match="not a dataset saved with save_to_disk"):
        project.compile(spec)


@pytest.mark.parametrize("data, message", [
    ({"files": ["a.jsonl"], "sources": [{"files": ["a.jsonl"]}]}, "exactly one of data.files or data.sources"),
    ({}, "exactly one of data.files or data.sources"),
    ({"sources": [{"files": ["a.jsonl"], "dataset": "d"}]}, "exactly one of files or dataset"),
    ({"sources": [{"files": ["a.jsonl"], "weight": 0}]}, "greater than 0"),
    ({"sources": [{"files": ["a.jsonl"], "format": "text"}]}, "text sources cannot be mixed"),
])
def test_bad_sources_are_spec_errors(data, message):
    from sftc.compiler.spec import parse_spec

    spec = base_spec()
    spec["data"] = {"format": "conversational", "fields": {"group": "g"}, **data}
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert message in str(info.value)


def test_data_files_specs_keep_their_lock_shape(project):
    """No sources: the lock's spec and manifest have no new keys, so shipped bundles keep their ids."""
    project.write_jsonl("data/rows.jsonl", [{"thread_id": str(i), "prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)])
    _, lock = _compile(project, base_spec())
    assert "sources" not in lock["spec"]["data"] and "sources" not in lock["data_manifest"]
    assert set(lock["spec"]["data"]["fields"]) == {"prompt", "completion", "messages", "text", "group"}
    assert set(lock["data_manifest"]["files"][0]) == {"path", "sha256", "rows_read", "accepted", "rejected"}


def test_the_json_schema_accepts_the_new_data_sections():
    """`sftc schema` is what editors check specs against: it must take what sftc takes."""
    import jsonschema

    from sftc.compiler.spec import json_schema, parse_spec

    for spec in (_mixture("data/ds", "data/oasst.jsonl"),
                 _spec({"files": ["a.json"], "format": "conversational", "fields": SHAREGPT_FIELDS}),
                 _spec({"files": ["a.jsonl"], "format": "prompt_completion", "fields": OASST_FIELDS})):
        parse_spec(spec)
        assert list(jsonschema.Draft202012Validator(json_schema()).iter_errors(spec)) == []


# --- row numbers as users look them up ---------------------------------------------------------


def _pc_rows(n: int, tag: str = "key") -> list[dict]:
    return [{"thread_id": f"t{i}", "prompt": f"Is {tag} T{100 + i} stale?", "completion": f"{tag} T{100 + i} is stale."}
            for i in range(n)]


def test_jsonl_rejects_name_the_physical_line_counting_blank_lines(project):
    from sftc.compiler.data import read_data
    from sftc.compiler.spec import parse_spec

    rows = _pc_rows(8)
    rows[3]["completion"] = ""
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "")  # blank lines are layout: not rows, but lines an editor counts
    lines.insert(5, "   ")
    lines.insert(7, "{broken")
    (project.root / "data").mkdir(exist_ok=True)
    path = project.root / "data/rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = parse_spec(_spec({"files": ["data/rows.jsonl"]}))
    result = read_data([(path, "data/rows.jsonl")], spec.data)
    physical = path.read_text(encoding="utf-8").splitlines()
    got = [(r.at, r.reason) for r in result.rejects]
    assert got == [(5, "empty_completion"), (8, "malformed_json")]
    # `sed -n 5p` (an editor's go-to-line 5) shows the rejected row
    assert json.loads(physical[5 - 1])["completion"] == "" and physical[8 - 1] == "{broken"
    assert [r.as_dict()["line"] for r in result.rejects] == [5, 8] and "row" not in result.rejects[0].as_dict()
    assert result.rejects[0].where == "data/rows.jsonl:5"
    # the internal row index (what seeded choices hash) still skips blank lines and starts at 0
    assert [r.row for r in result.rejects] == [3, 5]
    assert [e.ref for e in result.examples][:3] == ["data/rows.jsonl:0", "data/rows.jsonl:1", "data/rows.jsonl:2"]
    assert [e.at for e in result.examples][:3] == [1, 2, 4]

    bundle, _ = _compile(project, _spec({"files": ["data/rows.jsonl"]}))
    assert [(r["line"], r["reason"]) for r in read_jsonl(bundle / "rejects.jsonl")] == got
    for prompt in read_jsonl(bundle / "eval_prompts.jsonl"):  # file:line of the eval prompt's row
        file, line = prompt["source"].rsplit(":", 1)
        assert file == "data/rows.jsonl" and json.loads(physical[int(line) - 1])["thread_id"] == prompt["group"]


def test_json_and_parquet_rejects_name_the_1_based_row(project):
    from sftc.compiler.data import read_data
    from sftc.compiler.spec import parse_spec

    rows = _pc_rows(6)
    rows[0]["completion"] = ""
    rows[4]["completion"] = ""
    (project.root / "data").mkdir(exist_ok=True)
    (project.root / "data/rows.json").write_text(json.dumps(rows), encoding="utf-8")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), str(project.root / "data/rows.parquet"))
    spec = parse_spec(_spec({"files": ["data/rows.json"]}))
    for name in ("data/rows.json", "data/rows.parquet"):
        rejects = read_data([(project.root / name, name)], spec.data).rejects
        assert [r.as_dict()["row"] for r in rejects] == [1, 5] and "line" not in rejects[0].as_dict()
        assert rejects[1].where == f"{name} row 5"


# --- a hub dataset already in the local cache --------------------------------------------------

HUB_ID = "sftc-test-org/policy-rows"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face hub cache laid out as `hf download --repo-type dataset` leaves it, offline."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf-cache"
    repo = cache / ("datasets--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (snapshot / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT, encoding="utf-8")
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n", encoding="utf-8")
    rows = _pc_rows(24)
    rows[5]["completion"] = ""
    (snapshot / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return snapshot


def _hub_spec(**source) -> dict:
    return _spec({"sources": [{"dataset": HUB_ID, **source}]})


def test_a_hub_dataset_in_the_local_cache_compiles_offline(project, hub_cache):
    from sftc.io import sha256_file

    bundle, lock = _compile(project, _hub_spec())
    (entry,) = lock["data_manifest"]["files"]
    assert entry["path"] == f"hf://datasets/{HUB_ID}/data/train.jsonl"
    assert entry["repo"] == HUB_ID and entry["revision"] == COMMIT
    assert entry["sha256"].removeprefix("sha256:") == sha256_file(hub_cache / "data" / "train.jsonl")
    assert entry["rows_read"] == 24 and entry["rejected"] == {"empty_completion": 1}
    assert read_jsonl(bundle / "rejects.jsonl")[0]["file"] == entry["path"]
    assert read_jsonl(bundle / "rejects.jsonl")[0]["line"] == 6
    assert str(hub_cache.parent) not in (bundle / "bundle.lock.json").read_text()  # no machine path

    # pinned to the commit: same bundle; the run-time data check finds the file in the cache
    again, lock2 = _compile(project, _hub_spec(revision=COMMIT), force=True)
    assert (again / "train.safetensors").read_bytes() == (bundle / "train.safetensors").read_bytes()
    from sftc.runtime.bundle import load_bundle
    from sftc.runtime.verify import _check_data

    problems = []
    assert _check_data(load_bundle(bundle), problems)["checked"] == 1 and problems == []
    (hub_cache / "data" / "train.jsonl").write_text("", encoding="utf-8")
    _check_data(load_bundle(bundle), problems)
    assert len(problems) == 1 and "input data changed since compile" in problems[0]


def test_a_hub_dataset_with_splits_needs_split(project, hub_cache):
    shutil.copyfile(hub_cache / "data" / "train.jsonl", hub_cache / "data" / "test-00000-of-00001.jsonl")
    from sftc.errors import SftcError

    with pytest.raises(SftcError, match=r"holds files of the split\(s\) \['test'\]; no split given"):
        project.compile(_hub_spec())
    # a test file beside one of no named split is refused too: it must not be read as training rows
    (hub_cache / "data" / "train.jsonl").rename(hub_cache / "data" / "rows.jsonl")
    with pytest.raises(SftcError, match=r"holds files of the split\(s\) \['test'\]; no split given"):
        project.compile(_hub_spec())
    (hub_cache / "data" / "rows.jsonl").rename(hub_cache / "data" / "train.jsonl")
    _, lock = _compile(project, _hub_spec(split="train"))
    assert [f["path"] for f in lock["data_manifest"]["files"]] == [f"hf://datasets/{HUB_ID}/data/train.jsonl"]
    with pytest.raises(SftcError, match="no file of .* belongs to split 'validation'"):
        project.compile(_hub_spec(split="validation"))


def test_a_hub_dataset_not_in_the_cache_says_how_to_fetch_it(project, hub_cache):
    from sftc.errors import SftcError

    spec = _spec({"sources": [{"dataset": "sftc-test-org/not-cached", "revision": "v2"}]})
    with pytest.raises(SftcError) as info:
        project.compile(spec)
    text = str(info.value) + "\n".join(getattr(info.value, "details", None) or [])
    assert "`hf download sftc-test-org/not-cached --repo-type dataset --revision v2`" in text, text
    assert "data.sources[0].dataset" in text and "no download is attempted" in text
    with pytest.raises(SftcError):
        project.compile(_hub_spec(revision="no-such-branch"))
    # a directory in the project keeps meaning save_to_disk; revision is refused there
    (project.root / "data" / "saved").mkdir(parents=True)
    with pytest.raises(SftcError) as info:
        project.compile(_spec({"sources": [{"dataset": "data/saved", "revision": "main"}]}))
    text = str(info.value) + "\n".join(getattr(info.value, "details", None) or [])
    assert "revision: applies to a hub dataset id" in text, text
