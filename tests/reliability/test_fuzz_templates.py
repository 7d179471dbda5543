"""Chat templates fuzzed with hypothesis over a fixed row set (issue 14: templates are code).

Each generated template goes through what the compiler does with a template file: load_template
(the terminator probe, control tokens) and a render of every fixed row, prompt and full. Whatever
the template, the outcome is text or a TemplateRenderError / SpecError naming the template, within
the render time limit: never another exception, never a hang.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftc.compiler.spec import parse_spec
from sftc.compiler.template import RENDER_SECONDS, load_template, load_tokenizer
from sftc.errors import SftcError

from tests.compiler.conftest import base_spec

EXAMPLES = int(os.environ.get("SFTC_FUZZ_EXAMPLES", "1"))
ROWS = [
    [{"role": "user", "content": "Key T102 is stale."}, {"role": "assistant", "content": "Rotate it."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reset my password"},
     {"role": "assistant", "content": "Use the portal."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d" * 2000}],
    [{"role": "user", "content": "{{ 7*7 }} {% raw %}"}, {"role": "assistant", "content": "é ☃ \u200b"}],
]
GOOD = ("{%- for message in messages -%}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant|>\n{% endif -%}")

expressions = st.sampled_from([
    "message['content']", "message['role']", "messages|length", "loop.index", "c * 1000", "c * 10**11",
    "c ~ c ~ c", "1 / (messages|length - messages|length)", "messages[99]['x']", "raise_exception('no')",
    "range(10**9)|list", "lipsum(10**6)", "(c|length + 9) ** (10**9)", "messages|tojson", "'%s'|format(c)",
    "c.__class__", "cycler.__init__.__globals__", "namespace(x=c).x", "c|upper|replace('A', c * 100)",
    "eos_token", "bos_token", "add_generation_prompt", "none", "undefined_name.attr", "c[::-1]",
    "(c * 10**6)|wordwrap(3)", "c|center(10**10)", "dict(a=c)", "messages|map(attribute='content')|join",
])
statements = st.recursive(
    st.one_of(
        st.builds("{{{{ {} }}}}".format, expressions),
        st.sampled_from(["<|user|>", "<|assistant|>", "<|end|>", "\n", "text", "{#", "{%", "}}", "{% endfor %}",
                         "{% raw %}x{% endraw %}", "{% include '/etc/passwd' %}", "{% import 'x' as y %}",
                         "{% set c = c ~ c %}", "{% set ns = namespace(s=c) %}{% set ns.s = ns.s ~ ns.s %}"]),
    ),
    lambda inner: st.one_of(
        st.builds(lambda body: "{% for message in messages %}{% set c = message['content'] %}" + body + "{% endfor %}",
                  inner),
        st.builds(lambda body: "{% for i in range(100000) %}" + body + "{% endfor %}", inner),
        st.builds(lambda body: "{% if message is defined and 'T102' in message['content'] %}" + body + "{% endif %}",
                  inner),
        st.builds(lambda body: "{% macro f(n) %}" + body + "{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", inner),
        st.lists(inner, min_size=1, max_size=4).map("".join),
    ),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir), None, False, "model.tokenizer")


def _outcome(tokenizer, text: str, figures) -> str:
    figures["inputs_tried"] += 1
    figures["inputs_tried_templates"] += 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jinja"
        path.write_text("{% set c = 'x' %}" + text, encoding="utf-8")
        spec = parse_spec(base_spec(template={"chat": "fuzz.jinja"}), "spec.yaml")
        try:
            template = load_template(spec, tokenizer, path, "fuzz.jinja")
            for messages in ROWS:
                template.render(tokenizer, messages, add_generation_prompt=False, row="row x")
                template.render(tokenizer, messages[:-1], add_generation_prompt=True, row="row x")
            outcome = "rendered"
        except SftcError as exc:
            assert "fuzz.jinja" in str(exc) or "template" in str(exc), str(exc)
            outcome = "error"
        except Exception:
            figures["tracebacks"] += 1
            raise
    # every render has its own limit; a template fails on its first bad render
    if time.monotonic() - started > 2 * RENDER_SECONDS + 10:
        figures["hangs"] += 1
        pytest.fail(f"a template took {time.monotonic() - started:.0f} s: {text[:200]!r}")
    return outcome


@settings(max_examples=40 * EXAMPLES, deadline=None, derandomize=EXAMPLES == 1,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=statements)
def test_generated_templates_render_or_fail_clearly(tokenizer, body, figures):
    _outcome(tokenizer, GOOD.replace("{{ message['content'] }}", "{{ message['content'] }}" + body, 1), figures)


@settings(max_examples=40 * EXAMPLES, deadline=None, derandomize=EXAMPLES == 1,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(noise=st.text(alphabet=st.sampled_from(list("{}%#-+~|()[]'\"<>=!. \nabcxy09")), max_size=120))
def test_template_syntax_noise_fails_clearly(tokenizer, noise, figures):
    _outcome(tokenizer, GOOD + noise, figures)


def test_the_unfuzzed_template_renders(tokenizer, figures):
    assert _outcome(tokenizer, GOOD, figures) == "rendered"
