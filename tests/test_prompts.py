"""Prompt templates (agent/prompts/library.py) and `flask prompts` (agent/prompts/cli.py).

Template trees are built in tmp_path, so these tests do not depend on any app's templates;
one test checks the project's real settings/ folder, whatever it holds at test time.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask

from agent.prompts import PromptError, PromptLibrary, RenderedPrompt, Template, default_library, library_for
from agent.prompts.cli import prompts_group, register_cli

ROOT = Path(__file__).resolve().parent.parent

TITLE = """---
description: A storybook title.
system: You write for readers aged {{ age }}.
params: {temperature: 0.8, max_tokens: 40, stop: ["\\n\\n"]}
language: en
version_note: "v2: shorter"
samples:
  default: {topic: "a cat who flies", age: 6}
  older: {topic: "a lighthouse robot", age: 10}
---
Write one title about {{ topic }}.
"""

JSON_TPL = """---
description: Three ideas as JSON.
response_format: json
schema:
  type: object
  required: [ideas]
  properties:
    ideas: {type: array, minItems: 3, maxItems: 3, items: {type: string, maxLength: 50}}
samples:
  default: {theme: 雨天, notes: [安静, 温暖]}
---
Theme: {{ theme | tojson }}
{{ notes | bullet }}
"""


def write(root: Path, name: str, text: str) -> Path:
    path = root / f"{name}.j2"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def bump_mtime(path: Path) -> None:
    """Force a different mtime, as a coarse-clock filesystem might not change it by itself."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


@pytest.fixture
def lib(tmp_path: Path) -> PromptLibrary:
    write(tmp_path, "storybook/title", TITLE)
    write(tmp_path, "ideation/ideas", JSON_TPL)
    return PromptLibrary(tmp_path)


# ---- parsing -----------------------------------------------------------------------------------------


def test_front_matter_is_parsed(lib: PromptLibrary, tmp_path: Path) -> None:
    tpl = lib.get("storybook/title")
    assert isinstance(tpl, Template)
    assert tpl.name == "storybook/title" and tpl.path == tmp_path / "storybook" / "title.j2"
    assert tpl.description == "A storybook title."
    assert tpl.system == "You write for readers aged {{ age }}."
    assert tpl.params == {"temperature": 0.8, "max_tokens": 40, "stop": ["\n\n"]}
    assert tpl.response_format == "text" and tpl.schema is None
    assert list(tpl.samples) == ["default", "older"] and tpl.default_sample == "default"
    assert tpl.language == "en" and tpl.version_note == "v2: shorter"
    assert tpl.body.strip() == "Write one title about {{ topic }}."
    assert tpl.variables == ("age", "topic")
    assert len(tpl.hash) == 12 and int(tpl.hash, 16) >= 0
    js = lib.get("ideation/ideas")
    assert js.response_format == "json" and js.schema["required"] == ["ideas"]
    assert lib.names() == ["ideation/ideas", "storybook/title"]


def test_unknown_front_matter_key_is_an_error_naming_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "a/typo", "---\ndescripton: oops\ndescription: x\nsamples: {d: {}}\n---\nhi\n")
    with pytest.raises(PromptError) as err:
        PromptLibrary(tmp_path).get("a/typo")
    assert "'descripton'" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("front", "needle"),
    [
        ("samples: {d: {}}", "'description' is required"),
        ("description: x", "'samples' is required"),
        ("description: x\nsamples: {}", "'samples' is required"),
        ("description: x\nresponse_format: xml\nsamples: {d: {}}", "'text' or 'json'"),
        ("description: x\nresponse_format: json\nsamples: {d: {}}", "needs a 'schema'"),
        ("description: x\nschema: {type: object}\nsamples: {d: {}}", "only used with response_format: json"),
        (
            "description: x\nresponse_format: json\nschema: {type: 5}\nsamples: {d: {}}",
            "not a valid JSON Schema",
        ),
        (
            "description: x\nparams: {temperature: hot}\nsamples: {d: {}}",
            "params.temperature must be a number",
        ),
        (
            "description: x\nparams: {max_tokens: 1.5}\nsamples: {d: {}}",
            "params.max_tokens must be a whole number",
        ),
        ("description: x\nsystem: [a]\nsamples: {d: {}}", "'system' must be text"),
        ("description: x\nsamples: {d: [1]}", "sample 'd' must be a mapping"),
        ("description: [x\nsamples: {d: {}}", "not valid YAML"),
    ],
)
def test_bad_front_matter_is_reported(tmp_path: Path, front: str, needle: str) -> None:
    write(tmp_path, "a/bad", f"---\n{front}\n---\nhello\n")
    with pytest.raises(PromptError, match="bad.j2") as err:
        PromptLibrary(tmp_path).get("a/bad")
    assert needle in str(err.value)


def test_missing_front_matter_and_syntax_errors_say_where(tmp_path: Path) -> None:
    write(tmp_path, "a/plain", "just text\n")
    write(tmp_path, "a/open", "---\ndescription: x\n")
    write(tmp_path, "a/syntax", "---\ndescription: x\nsamples: {d: {}}\n---\nline one\n{% if %}\n")
    lib = PromptLibrary(tmp_path)
    with pytest.raises(PromptError, match="must start with a '---' line"):
        lib.get("a/plain")
    with pytest.raises(PromptError, match="no closing '---'"):
        lib.get("a/open")
    # the line number is the file's, not the body's
    with pytest.raises(PromptError, match=r"syntax\.j2:6: Jinja syntax error"):
        lib.get("a/syntax")


def test_unknown_and_unsafe_names(lib: PromptLibrary) -> None:
    with pytest.raises(PromptError, match="did you mean storybook/title"):
        lib.get("storybook/titel")
    for bad in ("../etc/passwd", "storybook/../../x", "/abs", "", "a//b"):
        with pytest.raises(PromptError, match="bad template name"):
            lib.get(bad)


# ---- rendering ---------------------------------------------------------------------------------------


def test_render_builds_system_and_user_messages(lib: PromptLibrary) -> None:
    out = lib.render("storybook/title", {"topic": "a snail", "age": 7})
    assert isinstance(out, RenderedPrompt)
    assert out.messages == [
        {"role": "system", "content": "You write for readers aged 7."},
        {"role": "user", "content": "Write one title about a snail."},
    ]
    assert out.name == "storybook/title" and out.hash == lib.get("storybook/title").hash
    assert out.params["max_tokens"] == 40 and out.response_format == "text" and out.schema is None
    out.params["max_tokens"] = 1  # callers may change their copy without touching the template
    assert lib.get("storybook/title").params["max_tokens"] == 40


def test_no_system_gives_only_a_user_message(tmp_path: Path) -> None:
    write(tmp_path, "a/b", "---\ndescription: x\nsamples: {d: {}}\n---\n\n  Hello.  \n\n")
    assert PromptLibrary(tmp_path).render("a/b").messages == [{"role": "user", "content": "Hello."}]


def test_missing_variables_are_all_named_at_once(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a/b",
        "---\ndescription: x\nsystem: '{{ zeta }}'\nsamples: {d: {}}\n---\n"
        "{{ beta }} {{ alpha }} {% for i in range(3) %}{{ i }}{% endfor %}"
        "{% set local = 1 %}{{ local }}{{ given }}\n",
    )
    lib = PromptLibrary(tmp_path)
    with pytest.raises(PromptError) as err:
        lib.render("a/b", {"given": 1, "extra": "fine"})
    message = str(err.value)
    assert "missing variable(s): alpha, beta, zeta" in message  # sorted, system's included
    assert "range" not in message.split("(it uses")[0] and "local" not in message.split("(it uses")[0]


def test_strict_undefined_attribute_is_an_error_not_blank(tmp_path: Path) -> None:
    write(tmp_path, "a/b", "---\ndescription: x\nsamples: {d: {user: {}}}\n---\nHi {{ user.name }}!\n")
    lib = PromptLibrary(tmp_path)
    with pytest.raises(PromptError, match="failed to render: UndefinedError"):
        lib.render("a/b", {"user": {}})
    assert lib.render("a/b", {"user": {"name": "Ada"}}).messages[-1]["content"] == "Hi Ada!"


def test_filters_keep_non_ascii_and_make_bullets(lib: PromptLibrary) -> None:
    content = lib.render("ideation/ideas", sample="default").messages[-1]["content"]
    assert content == 'Theme: "雨天"\n- 安静\n- 温暖'
    rendered = lib.render("ideation/ideas", {"theme": {"a": "<b>"}, "notes": "one"}, sample="default")
    assert rendered.messages[-1]["content"] == 'Theme: {"a": "<b>"}\n- one'  # no HTML escaping
    assert rendered.response_format == "json" and rendered.schema["properties"]["ideas"]["maxItems"] == 3


def test_samples_overlay_and_unknown_sample(lib: PromptLibrary) -> None:
    older = lib.render("storybook/title", sample="older")
    assert (
        older.messages[0]["content"].endswith("aged 10.")
        and "lighthouse robot" in older.messages[1]["content"]
    )
    mixed = lib.render("storybook/title", {"topic": "a kite"}, sample="older")
    assert mixed.messages[0]["content"].endswith("aged 10.") and "a kite" in mixed.messages[1]["content"]
    with pytest.raises(PromptError, match="no sample 'nope'; samples: default, older"):
        lib.render("storybook/title", sample="nope")


# ---- versions and reloading --------------------------------------------------------------------------


def test_edit_changes_hash_and_is_picked_up_without_a_new_library(lib: PromptLibrary, tmp_path: Path) -> None:
    first = lib.get("storybook/title")
    assert lib.get("storybook/title") is first  # unchanged file: the cached object, not a re-parse
    path = tmp_path / "storybook" / "title.j2"
    path.write_text(TITLE.replace("Write one title", "Write one SHORT title"), encoding="utf-8")
    bump_mtime(path)
    second = lib.get("storybook/title")
    assert second.hash != first.hash
    assert "SHORT" in lib.render("storybook/title", sample="default").messages[-1]["content"]
    assert lib.render("storybook/title", sample="default").hash == second.hash
    path.write_text(TITLE, encoding="utf-8")  # back to the first text -> back to the first hash
    bump_mtime(path)
    assert lib.get("storybook/title").hash == first.hash


def test_a_broken_edit_is_reported_then_fixed(lib: PromptLibrary, tmp_path: Path) -> None:
    path = tmp_path / "storybook" / "title.j2"
    path.write_text(TITLE.replace("language: en", "langauge: en"), encoding="utf-8")
    bump_mtime(path)
    with pytest.raises(PromptError, match="'langauge'"):
        lib.get("storybook/title")
    path.write_text(TITLE, encoding="utf-8")
    bump_mtime(path)
    assert lib.get("storybook/title").language == "en"
    path.unlink()
    with pytest.raises(PromptError, match="unknown template"):
        lib.get("storybook/title")


def test_concurrent_renders_while_the_file_changes(lib: PromptLibrary, tmp_path: Path) -> None:
    path = tmp_path / "storybook" / "title.j2"
    errors: list[BaseException] = []
    seen: set[str] = set()
    go = threading.Event()

    def worker() -> None:
        go.wait()
        try:
            for _ in range(200):
                seen.add(lib.render("storybook/title", sample="default").messages[-1]["content"])
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    go.set()
    for i in range(20):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(TITLE.replace("Write one title", f"Write title #{i}"), encoding="utf-8")
        os.replace(tmp, path)  # atomic, like most editors save
    for t in threads:
        t.join()
    assert errors == []
    assert "Write title #19 about a cat who flies." in {
        lib.render("storybook/title", sample="default").messages[-1]["content"]
    }
    assert seen  # every render returned a full message


# ---- check -------------------------------------------------------------------------------------------


def test_check_finds_broken_templates(lib: PromptLibrary, tmp_path: Path) -> None:
    assert lib.check() == []
    write(
        tmp_path,
        "a/needs_more",
        "---\ndescription: x\nsamples: {good: {a: 1, b: 2}, bad: {a: 1}}\n---\n{{ a }}{{ b }}\n",
    )
    write(tmp_path, "a/unknown_key", "---\ndescription: x\nsamples: {d: {}}\nmodel: gpt\n---\nhi\n")
    write(tmp_path, "a/empty", "---\ndescription: x\nsamples: {d: {}}\n---\n\n")
    errors = lib.check()
    assert len(errors) == 3, errors
    assert any(e.startswith("a/needs_more [sample bad]:") and "missing variable(s): b" in e for e in errors)
    assert not any("[sample good]" in e for e in errors)
    assert any(e.startswith("a/unknown_key:") and "'model'" in e for e in errors)
    assert any(e.startswith("a/empty [sample d]:") and "empty" in e for e in errors)


def test_warm_parses_every_template_once_before_first_use(lib: PromptLibrary, tmp_path: Path) -> None:
    """What a gunicorn worker does before its first request (gunicorn.conf.py post_worker_init)."""
    write(tmp_path, "storybook/title.warm", TITLE)
    write(tmp_path, "a/broken", "---\ndescription: x\n---\n{{ unclosed\n")
    assert lib.warm() == 3  # title, its variant, ideas; the broken one is cached as its error
    assert set(lib._cache) == {"storybook/title", "storybook/title.warm", "ideation/ideas", "a/broken"}
    assert lib._cache["a/broken"].error is not None
    parsed = dict(lib._cache)
    assert lib.get("storybook/title") is parsed["storybook/title"].template  # a cache hit, not a re-parse
    with pytest.raises(PromptError):
        lib.get("a/broken")


def test_project_templates_all_pass_check() -> None:
    lib = PromptLibrary(ROOT / "settings")
    assert lib.names(), "no templates found in settings/"
    assert "examples/hello" in lib.names()
    assert lib.check() == []


def test_default_library_follows_prompts_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMPTS_DIR", raising=False)
    assert default_library().root == (ROOT / "settings").resolve()
    monkeypatch.setenv("PROMPTS_DIR", str(tmp_path))
    assert default_library().root == tmp_path.resolve()
    assert default_library() is default_library() is library_for(tmp_path)


# ---- CLI ---------------------------------------------------------------------------------------------


def cli(root: Path, *args: str) -> Any:
    return CliRunner().invoke(prompts_group, ["--dir", str(root), *args])


def test_cli_list_and_show(lib: PromptLibrary, tmp_path: Path) -> None:
    out = cli(tmp_path, "list")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[:2] == ["ideation/ideas", lib.get("ideation/ideas").hash]
    assert "storybook/title" in lines[1] and "A storybook title." in lines[1]
    shown = cli(tmp_path, "show", "storybook/title")
    assert shown.exit_code == 0, shown.output
    for needle in (
        "hash:            " + lib.get("storybook/title").hash,
        "variables:       age, topic",
        "samples:         default, older",
        "--- system",
        "Write one title about {{ topic }}.",
    ):
        assert needle in shown.output
    missing = cli(tmp_path, "show", "storybook/nope")
    assert missing.exit_code == 1 and "unknown template" in missing.output


def test_cli_render_text_json_and_errors(lib: PromptLibrary, tmp_path: Path) -> None:
    out = cli(tmp_path, "render", "storybook/title")  # first sample by default
    assert out.exit_code == 0, out.output
    assert "--- user\nWrite one title about a cat who flies." in out.output
    out = cli(
        tmp_path,
        "render",
        "storybook/title",
        "--sample",
        "older",
        "--var",
        "topic=a kite",
        "--var",
        "age=12",
        "--json",
    )
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["sample"] == "older" and data["hash"] == lib.get("storybook/title").hash
    assert data["messages"] == [
        {"role": "system", "content": "You write for readers aged 12."},
        {"role": "user", "content": "Write one title about a kite."},
    ]
    out = cli(tmp_path, "render", "ideation/ideas", "--var", 'notes=["a", "b"]', "--json")
    assert json.loads(out.output)["messages"][-1]["content"].endswith("- a\n- b")
    bad = cli(tmp_path, "render", "storybook/title", "--sample", "nope")
    assert bad.exit_code == 1 and "no sample 'nope'" in bad.output
    bad = cli(tmp_path, "render", "storybook/title", "--var", "oops")
    assert bad.exit_code == 2 and "key=value" in bad.output


def test_cli_check_exit_codes(lib: PromptLibrary, tmp_path: Path) -> None:
    ok = cli(tmp_path, "check")
    assert ok.exit_code == 0 and "2 templates OK" in ok.output
    write(tmp_path, "a/broken", "---\ndescription: x\nsamples: {d: {}}\n---\n{{ nope }}\n")
    bad = cli(tmp_path, "check")
    assert bad.exit_code == 1
    assert "a/broken [sample d]" in bad.output and "missing variable(s): nope" in bad.output
    assert "1 of 3 templates have problems" in bad.output


def test_cli_inside_flask_uses_the_apps_prompts_dir(lib: PromptLibrary, tmp_path: Path) -> None:
    app = Flask("t")
    app.config["PROMPTS_DIR"] = str(tmp_path)
    register_cli(app)
    runner = app.test_cli_runner()
    out = runner.invoke(args=["prompts", "check"])
    assert out.exit_code == 0 and "2 templates OK" in out.output
    out = runner.invoke(args=["prompts", "render", "storybook/title.j2", "--sample", "older"])
    assert out.exit_code == 0 and "aged 10." in out.output


def test_cli_run_calls_the_configured_model_and_records_the_version(
    make_app: Any, fake_openai: Any, tmp_path: Path
) -> None:
    prompts_dir = tmp_path / "prompts"
    write(prompts_dir, "storybook/title", TITLE)
    app = make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="test-key",
        LLM_MODEL="fake-model",
        PROMPTS_DIR=str(prompts_dir),
    )
    fake_openai.script("The Cat Who Flew")
    out = app.test_cli_runner().invoke(args=["prompts", "run", "storybook/title", "--var", "topic=a kite"])
    assert out.exit_code == 0, out.output
    assert "The Cat Who Flew" in out.output and "provider openai" in out.output
    sent = fake_openai.chat_requests()[-1]["json"]["messages"]
    assert sent[-1]["content"] == "Write one title about a kite."  # the sample, with the --var applied
    record = app.extensions["services"].db.generations.find_one({"template": "storybook/title"})
    assert record is not None
    assert record["template_hash"] == PromptLibrary(prompts_dir).get("storybook/title").hash
    assert record["app"] == "storybook" and record["output"] == "The Cat Who Flew"
