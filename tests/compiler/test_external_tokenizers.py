"""Real tokenizers and chat templates (Phi-3, Qwen2.5 ChatML): the mask is right on them too.

The model directory is the real tokenizer files copied into the project plus a tiny config.json
(compile never reads weights). Skipped, with the path in the reason, only when the external
material (SFTC_EXTERNAL, default <repo>/../shared/external) is absent.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from .conftest import IGNORE_INDEX, base_spec, bundle_tokenizer, external_path, load_tokens, read_jsonl, segments
from .conftest import write_tiny_llama_config

IM_START, IM_END, NEWLINE = 151644, 151645, 198

ROWS = [
    {"thread_id": "T102", "prompt": "Key T102 is stale.", "completion": "Ask for rotation evidence within 24 hours."},
    {"thread_id": "R550", "prompt": "A privileged role changed overnight.", "completion": "Escalate privileged-role changes."},
    {"thread_id": "P771", "prompt": "How long may a session stay idle?", "completion": "Cite the session-timeout policy."},
]


def _install(project, tokenizer_name: str, vocab_size: int) -> None:
    source = external_path("tokenizers", tokenizer_name)
    target = project.root / "model"
    shutil.rmtree(target)
    target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    write_tiny_llama_config(target, vocab_size)


def _supervised_runs(labels: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of supervised positions."""
    positions = np.flatnonzero(labels != IGNORE_INDEX)
    if not len(positions):
        return []
    breaks = np.flatnonzero(np.diff(positions) > 1)
    starts = np.concatenate([[positions[0]], positions[breaks + 1]])
    ends = np.concatenate([positions[breaks], [positions[-1]]]) + 1
    return list(zip(starts.tolist(), ends.tolist()))


def _compile_rows(project, rows, **overrides):
    project.write_jsonl("data/rows.jsonl", rows)
    bundle, lock, _ = project.compile(base_spec(**overrides))
    assert read_jsonl(bundle / "rejects.jsonl") == []
    return bundle, lock


def test_phi3_supervises_answer_and_end_token_only(project):
    _install(project, "phi3-mini-instruct", 32064)
    bundle, lock = _compile_rows(project, ROWS)
    tokenizer = bundle_tokenizer(bundle, lock)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert lock.template.terminator == "<|end|>"
    assert lock.template.terminator_id == end_id == 32007
    assert lock.template.source == "tokenizer"

    completions = {r["prompt"]: r["completion"] for r in ROWS}
    seen = 0
    for _, ids, labels in segments(load_tokens(bundle)):
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        prompt = next(p for p in completions if p in text)
        supervised = labels != IGNORE_INDEX
        assert tokenizer.decode(ids[supervised].tolist(), skip_special_tokens=False) == completions[prompt] + "<|end|>"
        runs = _supervised_runs(labels)
        assert len(runs) == 1
        start, end = runs[0]
        assert ids[end - 1] == end_id
        # everything before the answer (user turn, its <|end|>, <|assistant|>\n) is context
        before = tokenizer.decode(ids[:start].tolist(), skip_special_tokens=False)
        # (Phi-3's role tokens are rstrip specials: the "\n" after them is absorbed into the token)
        assert before.rstrip("\n").endswith("<|assistant|>") and prompt in before
        assert int((ids[:start] == end_id).sum()) == 1  # the user turn's <|end|>, unsupervised
        # and the template's tail after the turn (\n, <|endoftext|>) is not a target
        assert not supervised[end:].any()
        assert tokenizer.decode(ids[end:].tolist(), skip_special_tokens=False).strip() == "<|endoftext|>"
        seen += 1
    assert seen == len(ROWS)


def test_qwen25_chatml_supervises_im_end_but_not_the_newline_or_header(project):
    _install(project, "qwen2.5-instruct", 151936)
    bundle, lock = _compile_rows(project, ROWS)
    tokenizer = bundle_tokenizer(bundle, lock)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == IM_END
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == IM_START
    assert lock.template.terminator == "<|im_end|>"
    assert lock.template.terminator_id == IM_END

    completions = {r["prompt"]: r["completion"] for r in ROWS}
    for _, ids, labels in segments(load_tokens(bundle)):
        supervised = labels != IGNORE_INDEX
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        prompt = next(p for p in completions if p in text)
        assert tokenizer.decode(ids[supervised].tolist(), skip_special_tokens=False) == completions[prompt] + "<|im_end|>"

        # exactly one <|im_end|> is a target: the answer's; the system and user ones are context
        im_end_positions = np.flatnonzero(ids == IM_END)
        assert len(im_end_positions) == 3  # default system, user, assistant
        assert supervised[im_end_positions].tolist() == [False, False, True]
        # the "\n" the template writes after <|im_end|> is never a target
        for position in im_end_positions:
            assert ids[position + 1] == NEWLINE
            assert labels[position + 1] == IGNORE_INDEX
        # no <|im_start|> role header (including "<|im_start|>assistant\n") is a target
        for position in np.flatnonzero(ids == IM_START):
            assert not supervised[position : position + 3].any()
        header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        (start, end), = _supervised_runs(labels)
        assert ids[start - len(header) : start].tolist() == header
        assert ids[end - 1] == IM_END


def test_qwen25_multi_turn_supervises_every_assistant_turn_and_no_user_turn(project):
    _install(project, "qwen2.5-instruct", 151936)
    user = ["Key T102 is stale.", "The owner attached the rotation proof for T102."]
    assistant = ["Ask for rotation evidence within 24 hours.", "Approve access after rotation proof."]
    rows = [
        {"thread_id": "T102", "messages": [
            {"role": "user", "content": user[0]}, {"role": "assistant", "content": assistant[0]},
            {"role": "user", "content": user[1]}, {"role": "assistant", "content": assistant[1]},
        ]},
        {"thread_id": "R550", "messages": [
            {"role": "user", "content": "A privileged role changed overnight."},
            {"role": "assistant", "content": "Escalate privileged-role changes."},
        ]},
    ]
    bundle, lock = _compile_rows(project, rows, data={"format": "conversational"}, split={"eval_groups": ["R550"]})
    tokenizer = bundle_tokenizer(bundle, lock)
    (row,) = list(segments(load_tokens(bundle)))
    _, ids, labels = row
    supervised = labels != IGNORE_INDEX
    decoded = tokenizer.decode(ids[supervised].tolist(), skip_special_tokens=False)
    assert decoded == assistant[0] + "<|im_end|>" + assistant[1] + "<|im_end|>"
    assert not any(u in decoded for u in user)

    runs = _supervised_runs(labels)
    assert len(runs) == 2
    for (start, end), answer in zip(runs, assistant):
        assert tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False) == answer + "<|im_end|>"
        assert labels[end] == IGNORE_INDEX and ids[end] == NEWLINE
    # both user turns are present as context, and carry no label
    between = tokenizer.decode(ids[runs[0][1] : runs[1][0]].tolist(), skip_special_tokens=False)
    assert user[1] in between
    assert user[0] in tokenizer.decode(ids[: runs[0][0]].tolist(), skip_special_tokens=False)

    # the held-out conversation is the eval prompt, ending with the generation prompt
    (prompt,) = read_jsonl(bundle / "eval_prompts.jsonl")
    assert prompt["group"] == "R550"
    assert prompt["prompt_text"].endswith("<|im_start|>assistant\n")
    assert prompt["reference"] == "Escalate privileged-role changes."


def test_golden_render_qwen25_matches_the_template(project):
    """The tokenizer's template renders like the real one does (guard against a wrong fixture)."""
    _install(project, "qwen2.5-instruct", 151936)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(project.root / "model"))
    ids = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello, 你好! 12345"},
         {"role": "assistant", "content": "Hi there."}],
        tokenize=True,
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in transformers 5
    assert list(ids) == [
        151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 9707, 11, 220, 108386,
        0, 220, 16, 17, 18, 19, 20, 151645, 198, 151644, 77091, 198, 13048, 1052, 13, 151645, 198,
    ]


def _template_text(name: str) -> str:
    import json

    folder = external_path("chat-templates", name)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    if isinstance(template, list):
        template = next(t["template"] for t in template if t.get("name") == "default")
    return template


# Real ChatML-family templates (Qwen3's has no {% generation %} markers; the compiler never
# uses them anyway), rendered with the Qwen2.5
# tokenizer (same <|im_start|>/<|im_end|> specials). Qwen3's template writes an empty think block
# into the final assistant turn; it comes after the generation prompt, so it is part of what the
# model must produce (as in TRL's own Qwen3 training template) and is supervised with the answer.
@pytest.mark.parametrize("name, answer_prefix", [("qwen3", "<think>\n\n</think>\n\n"), ("smollm3", "")])
def test_templates_without_generation_markers_still_get_a_mask(project, name, answer_prefix):
    template = _template_text(name)
    if name == "qwen3":
        assert "{% generation %}" not in template  # the mask cannot lean on generation markers
    _install(project, "qwen2.5-instruct", 151936)
    (project.root / "templates").mkdir()
    (project.root / "templates" / f"{name}.jinja").write_text(template, encoding="utf-8")
    bundle, lock = _compile_rows(
        project, ROWS, template={"chat": f"templates/{name}.jinja"},
        tokenize={"max_length": 1024}, packing={"seq_length": 2048},  # SmolLM3's system block is long
    )
    assert lock.template.source == "file"
    assert lock.template.path == f"templates/{name}.jinja"
    assert lock.template.terminator == "<|im_end|>"
    tokenizer = bundle_tokenizer(bundle, lock)
    completions = {r["prompt"]: r["completion"] for r in ROWS}
    seen = 0
    for _, ids, labels in segments(load_tokens(bundle)):
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        prompt = next(p for p in completions if p in text)
        decoded = tokenizer.decode(ids[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)
        assert decoded == answer_prefix + completions[prompt] + "<|im_end|>"
        assert len(_supervised_runs(labels)) == 1
        seen += 1
    assert seen == len(ROWS)


@pytest.mark.xfail(strict=True, reason=(
    "known bug: SmolLM3's template calls strftime_now(), so the token stream depends on the day of "
    "the compile while the bundle id does not; the compiler should pin the date or refuse such templates"
))
def test_clock_dependent_template_cannot_give_one_id_two_contents(project, monkeypatch):
    import datetime as real

    import transformers.utils.chat_template_utils as ctu

    from sftc.errors import SftcError

    _install(project, "qwen2.5-instruct", 151936)
    (project.root / "templates").mkdir()
    (project.root / "templates" / "smollm3.jinja").write_text(_template_text("smollm3"), encoding="utf-8")
    project.write_jsonl("data/rows.jsonl", ROWS)
    spec = project.write_spec(base_spec(template={"chat": "templates/smollm3.jinja"},
                                        tokenize={"max_length": 1024}, packing={"seq_length": 2048}))

    def on_day(day):
        class Fixed(real.datetime):
            @classmethod
            def now(cls, tz=None):
                return real.datetime(2025, 1, day, 12, 0, 0)

        monkeypatch.setattr(ctu, "datetime", Fixed)

    try:
        on_day(1)
        a, lock_a, _ = project.compile(spec, bundles_dir=project.root / "out-a")
        on_day(2)
        b, lock_b, _ = project.compile(spec, bundles_dir=project.root / "out-b")
    except SftcError as exc:  # refusing a clock-dependent template is an acceptable fix
        assert "strftime" in str(exc) or "date" in str(exc)
        return
    if lock_a["bundle_id"] == lock_b["bundle_id"]:
        assert (a / "train.safetensors").read_bytes() == (b / "train.safetensors").read_bytes()
