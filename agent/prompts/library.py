"""Prompt templates that designers edit: `settings/<app>/<name>.j2`.

A template file is YAML front matter between `---` lines (description, system
message, model params, output format, sample inputs) followed by a Jinja body
(the user message). Designers change prompts without touching code, so this
module is strict where a silent mistake would cost a study: unknown front-matter
keys are errors, a missing variable is an error (never an empty string) and every
missing variable is named at once. Each template carries a short hash of its file
text, stored with every generation, so an output can be traced to the exact
version that produced it. Files are re-read when they change on disk (mtime /
size), so edits apply without a restart, while an unchanged file costs one stat.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import jinja2
import jsonschema
import yaml
from jinja2 import meta

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SUFFIX = ".j2"
VARIANT_SEP = "."  # settings/<app>/<name>.<variant>.j2 is a variant of <app>/<name> (studies)

ALLOWED_KEYS = (
    "description",
    "system",
    "params",
    "response_format",
    "schema",
    "samples",
    "version_note",
    "language",
)
RESPONSE_FORMATS = ("text", "json")
# Model params whose type we can check; other keys (top_k, min_p, model, ...) pass through to the provider.
_PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "temperature": (int, float),
    "top_p": (int, float),
    "max_tokens": (int,),
    "seed": (int,),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    # llama.cpp sampling (the embedded model; OpenAI-compatible servers ignore or accept them)
    "repeat_penalty": (int, float),
    "top_k": (int,),
    "min_p": (int, float),
}
T = TypeVar("T")
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class PromptError(Exception):
    """A template is broken, unknown, or was given too few variables; the message says which."""


@dataclass(frozen=True)
class Template:
    """One parsed template file (cached; treat as read-only)."""

    name: str
    path: Path
    description: str
    system: str | None
    body: str
    params: dict[str, Any]
    response_format: str
    schema: dict[str, Any] | None
    samples: dict[str, dict[str, Any]]
    language: str | None
    version_note: str | None
    hash: str  # sha256 hex of the whole file text, first 12 chars
    variables: tuple[str, ...] = ()  # every variable body + system mention, sorted

    @property
    def default_sample(self) -> str:
        """The first sample is the default one (what the CLI uses without --sample)."""
        return next(iter(self.samples))


@dataclass
class RenderedPrompt:
    """A template filled in: ready for agent.llm (messages + params), with name + hash for the record."""

    name: str
    hash: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    response_format: str
    schema: dict[str, Any] | None
    variant: str | None = None  # the study condition's variant file used (`<name>.<variant>.j2`), else None


def _tojson(value: Any, indent: int | None = None) -> str:
    """JSON for prompts: keeps non-ASCII text readable (Jinja's own tojson escapes for HTML)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _bullet(items: Any, marker: str = "-") -> str:
    """["a", "b"] -> "- a\\n- b" (a single string becomes one bullet; None/empty -> "")."""
    if items is None or isinstance(items, jinja2.Undefined):
        return ""
    if isinstance(items, str):
        items = [items]
    return "\n".join(f"{marker} {item}" for item in items)


def make_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
    )
    env.filters["tojson"] = _tojson
    env.filters["bullet"] = _bullet
    return env


@dataclass
class _Entry:
    """A cache slot: the file signature it was loaded from and what loading produced."""

    signature: tuple[int, int, int, int]
    template: Template | None = None
    body: jinja2.Template | None = None
    system: jinja2.Template | None = None
    error: PromptError | None = None
    required: frozenset[str] = field(default_factory=frozenset)


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    # ctime/inode catch editors that replace the file or restore an old mtime
    return (st.st_mtime_ns, st.st_size, st.st_ctime_ns, st.st_ino)


def _split_front_matter(text: str, where: str) -> tuple[str, str, int]:
    """-> (front matter YAML, body, line number in the file where the body starts)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise PromptError(f"{where}: a template must start with a '---' line, then the front matter")
    for i in range(1, len(lines)):
        if lines[i].rstrip("\r\n").rstrip() == "---":
            return "".join(lines[1:i]), "".join(lines[i + 1 :]), i + 2
    raise PromptError(f"{where}: the front matter has no closing '---' line")


def check_params(params: Any, where: str) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise PromptError(
            f"{where}: 'params' must be a mapping such as {{temperature: 0.7, max_tokens: 400}}"
        )
    for key, value in params.items():
        if not isinstance(key, str):
            raise PromptError(f"{where}: params key {key!r} must be a name")
        types = _PARAM_TYPES.get(key)
        if types and value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            kind = "a whole number" if types == (int,) else "a number"
            raise PromptError(f"{where}: params.{key} must be {kind}, not {value!r}")
        if key == "stop" and value is not None:
            ok = isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            )
            if not ok:
                raise PromptError(f"{where}: params.stop must be a string or a list of strings")
    return dict(params)


def _check_samples(samples: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(samples, dict) or not samples:
        raise PromptError(
            f"{where}: 'samples' is required: at least one named set of example variables, "
            'e.g. samples: {{default: {{topic: "a cat"}}}}'
        )
    out: dict[str, dict[str, Any]] = {}
    for key, value in samples.items():
        if value is None:
            value = {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise PromptError(f"{where}: sample {key!r} must be a mapping of variable name -> value")
        out[str(key)] = value
    return out


def _optional_str(meta_: dict[str, Any], key: str, where: str) -> str | None:
    value = meta_.get(key)
    if value is not None and not isinstance(value, str):
        raise PromptError(f"{where}: '{key}' must be text, not {type(value).__name__}")
    return value


def _compile(
    env: jinja2.Environment, source: str, where: str, first_line: int
) -> tuple[jinja2.Template, set[str]]:
    try:
        ast = env.parse(source)
        compiled = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        line = (exc.lineno or 1) + first_line - 1
        raise PromptError(f"{where}:{line}: Jinja syntax error: {exc.message}") from exc
    return compiled, set(meta.find_undeclared_variables(ast)) - set(env.globals)


def parse_template(name: str, path: Path, data: bytes, env: jinja2.Environment) -> _Entry:
    """Parse one file's bytes into a cache entry (signature filled in by the caller)."""
    where = str(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptError(f"{where}: not UTF-8 text ({exc})") from exc
    front, body, body_line = _split_front_matter(text, where)
    try:
        meta_ = yaml.safe_load(front)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 2}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PromptError(f"{where}{line}: the front matter is not valid YAML: {problem}") from exc
    if meta_ is None:
        meta_ = {}
    if not isinstance(meta_, dict):
        raise PromptError(f"{where}: the front matter must be 'key: value' lines")
    unknown = sorted(str(k) for k in meta_ if k not in ALLOWED_KEYS)
    if unknown:
        raise PromptError(
            f"{where}: unknown front matter key(s) {', '.join(repr(k) for k in unknown)}; "
            f"allowed: {', '.join(ALLOWED_KEYS)}"
        )
    description = meta_.get("description")
    if not isinstance(description, str) or not description.strip():
        raise PromptError(f"{where}: 'description' is required (one line saying what the template is for)")
    system_src = _optional_str(meta_, "system", where)
    params = check_params(meta_.get("params"), where)
    response_format = meta_.get("response_format") or "text"
    if response_format not in RESPONSE_FORMATS:
        raise PromptError(f"{where}: response_format must be 'text' or 'json', not {response_format!r}")
    schema = meta_.get("schema")
    if response_format == "json":
        if not isinstance(schema, dict):
            raise PromptError(f"{where}: response_format: json needs a 'schema' (a JSON Schema mapping)")
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            loc = "/".join(str(p) for p in exc.absolute_path) or "(top)"
            raise PromptError(
                f"{where}: 'schema' is not a valid JSON Schema at {loc}: {exc.message}"
            ) from exc
    elif schema is not None:
        raise PromptError(
            f"{where}: 'schema' is only used with response_format: json (add that line or drop schema)"
        )
    samples = _check_samples(meta_.get("samples"), where)

    body_tpl, required = _compile(env, body, where, body_line)
    system_tpl = None
    if system_src is not None:
        system_tpl, system_vars = _compile(env, system_src, f"{where} (system)", 1)
        required |= system_vars
    template = Template(
        name=name,
        path=path,
        description=description.strip(),
        system=system_src,
        body=body,
        params=params,
        response_format=response_format,
        schema=schema,
        samples=samples,
        language=_optional_str(meta_, "language", where),
        version_note=_optional_str(meta_, "version_note", where),
        hash=hashlib.sha256(data).hexdigest()[:12],
        variables=tuple(sorted(required)),
    )
    return _Entry(
        signature=(0, 0, 0, 0),
        template=template,
        body=body_tpl,
        system=system_tpl,
        required=frozenset(required),
    )


class PromptLibrary:
    """All templates under one settings/ folder; thread-safe, cached, reloaded on change."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.env = make_environment()
        self._cache: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        # (fingerprint, problems) of the last whole-library check, for check_cached()
        self._checked: tuple[tuple[tuple[str, tuple[int, int, int, int]], ...], list[str]] | None = None
        # (relative path, parser) -> (file signature, parsed value) of data files beside the templates
        self._data: dict[tuple[str, Callable[..., Any]], tuple[tuple[int, int, int, int], Any]] = {}

    # -- lookup -------------------------------------------------------------------------------------
    def _path_for(self, name: str) -> Path:
        parts = name.split("/") if isinstance(name, str) else []
        if not parts or not all(_SEGMENT.match(p) and p not in (".", "..") for p in parts):
            raise PromptError(f"bad template name {name!r}: use '<app>/<name>', e.g. 'storybook/title'")
        return self.root.joinpath(*parts[:-1], parts[-1] + SUFFIX)

    def names(self, *, variants: bool = False) -> list[str]:
        """Every template as '<app>/<name>', sorted; variant files (`<name>.<variant>.j2`) only when asked."""
        if not self.root.is_dir():
            return []
        found = (
            p.relative_to(self.root).with_suffix("").as_posix()
            for p in self.root.rglob("*" + SUFFIX)
            if p.is_file()
        )
        return sorted(n for n in found if variants or VARIANT_SEP not in n.rsplit("/", 1)[-1])

    def variants(self, name: str) -> list[str]:
        """The variants of one template: 'warm' for the file `<name>.warm.j2` beside `<name>.j2`."""
        base = self._path_for(name)
        prefix = base.name[: -len(SUFFIX)] + VARIANT_SEP
        if not base.parent.is_dir():
            return []
        return sorted(
            p.name[len(prefix) : -len(SUFFIX)]
            for p in base.parent.glob(prefix + "*" + SUFFIX)
            if p.is_file() and VARIANT_SEP not in p.name[len(prefix) : -len(SUFFIX)]
        )

    def _unknown(self, name: str) -> PromptError:
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return PromptError(f"unknown template {name!r}: no file {self._path_for(name)}{hint}")

    def _entry(self, name: str) -> _Entry:
        path = self._path_for(name)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            with self._lock:
                self._cache.pop(name, None)
            raise self._unknown(name) from None
        sig = _signature(st)
        with self._lock:
            entry = self._cache.get(name)
        if entry is not None and entry.signature == sig:
            return entry
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PromptError(f"{path}: cannot read ({exc})") from exc
        try:
            entry = parse_template(name, path, data, self.env)
        except PromptError as exc:
            # cache the error too: no re-parse until the file changes
            entry = _Entry(signature=sig, error=exc)
        entry.signature = sig
        with self._lock:
            self._cache[name] = entry
        return entry

    def get(self, name: str) -> Template:
        """The parsed template; re-read only when its file changed since the last call."""
        entry = self._entry(name)
        if entry.error is not None:
            raise PromptError(str(entry.error))
        assert entry.template is not None
        return entry.template

    def warm(self) -> int:
        """Parse every template (variants too) into the cache now; returns how many parsed cleanly.

        A template is parsed on first use otherwise, ~6 ms each here (48 files: 300 ms): a gunicorn worker
        calls this before it takes requests, so a participant's first book does not pay it while holding
        the worker's GIL. A broken file is cached as its error, as on first use.
        """
        ok = 0
        for name in self.names(variants=True):
            try:
                self.get(name)
            except PromptError:
                continue  # cached as its error; /health and the first request report it
            ok += 1
        return ok

    def data_file(self, relative: str, parse: Callable[[Path, bytes], T]) -> T | None:
        """A settings data file beside the templates (e.g. `refinement/sd_options.yaml`), parsed by `parse`.

        Cached by the same file signature as the templates, so designers' edits apply on the next call while
        an unchanged file costs one stat. None when the file does not exist; a parse error is not cached.
        """
        path = self.root / relative
        try:
            sig = _signature(os.stat(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        key = (relative, parse)
        with self._lock:
            cached = self._data.get(key)
        if cached is not None and cached[0] == sig:
            return cached[1]
        value = parse(path, path.read_bytes())
        with self._lock:
            self._data[key] = (sig, value)
        return value

    # -- rendering ----------------------------------------------------------------------------------
    def render(
        self,
        name: str,
        variables: dict[str, Any] | None = None,
        *,
        sample: str | None = None,
        variant: str | None = None,
    ) -> RenderedPrompt:
        """Fill in a template. With `sample`, start from that sample's variables, then apply `variables`.

        `variant` (a study condition's choice) renders `<name>.<variant>.j2` instead; the result keeps
        the base name, so records of every condition group under one template.
        """
        if variant is not None:
            return self._render_variant(name, variant, variables, sample)
        entry = self._entry(name)
        if entry.error is not None:
            raise PromptError(str(entry.error))
        tpl = entry.template
        assert tpl is not None and entry.body is not None
        values: dict[str, Any] = {}
        if sample is not None:
            if sample not in tpl.samples:
                raise PromptError(
                    f"template {name!r} has no sample {sample!r}; samples: {', '.join(tpl.samples)}"
                )
            values.update(copy.deepcopy(tpl.samples[sample]))
        values.update(variables or {})
        missing = sorted(entry.required - values.keys())
        if missing:
            raise PromptError(
                f"template {name!r} is missing variable(s): {', '.join(missing)} "
                f"(it uses: {', '.join(tpl.variables)})"
            )
        messages: list[dict[str, Any]] = []
        try:
            if entry.system is not None:
                messages.append({"role": "system", "content": entry.system.render(values).strip()})
            messages.append({"role": "user", "content": entry.body.render(values).strip()})
        except PromptError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure inside a template is the template's error
            raise PromptError(f"template {name!r} failed to render: {type(exc).__name__}: {exc}") from exc
        return RenderedPrompt(
            name=tpl.name,
            hash=tpl.hash,
            messages=messages,
            params=copy.deepcopy(tpl.params),
            response_format=tpl.response_format,
            schema=copy.deepcopy(tpl.schema),
        )

    def _render_variant(
        self, name: str, variant: str, variables: dict[str, Any] | None, sample: str | None
    ) -> RenderedPrompt:
        if not isinstance(variant, str) or not _SEGMENT.match(variant) or VARIANT_SEP in variant:
            raise PromptError(f"bad variant {variant!r} of {name!r}: use a plain word such as 'warm'")
        self.get(name)  # the base template must exist (and parse): a variant never stands alone
        if variant not in self.variants(name):
            known = ", ".join(self.variants(name)) or "none"
            raise PromptError(
                f"template {name!r} has no variant {variant!r}: no file "
                f"{self._path_for(name + VARIANT_SEP + variant)} (variants: {known})"
            )
        rendered = self.render(name + VARIANT_SEP + variant, variables, sample=sample)
        rendered.name, rendered.variant = name, variant
        return rendered

    def check(self, names: Iterable[str] | None = None) -> list[str]:
        """Load every template (and variant) and render it with every sample; one string per problem."""
        errors: list[str] = []
        if names is None:
            names = self.names(variants=True)
            errors.extend(self._check_variants(names))
        for name in names:
            try:
                tpl = self.get(name)
            except PromptError as exc:
                errors.append(f"{name}: {exc}")
                continue
            for sample in tpl.samples:
                try:
                    rendered = self.render(name, sample=sample)
                except PromptError as exc:
                    errors.append(f"{name} [sample {sample}]: {exc}")
                    continue
                if not rendered.messages[-1]["content"]:
                    errors.append(f"{name} [sample {sample}]: the user message renders empty")
        return errors

    def fingerprint(self) -> tuple[tuple[str, tuple[int, int, int, int]], ...]:
        """Every template's name and file signature: it changes when a template is added, removed or edited."""
        found: list[tuple[str, tuple[int, int, int, int]]] = []
        for name in self.names():
            try:
                found.append((name, _signature(os.stat(self._path_for(name)))))
            except OSError:
                found.append((name, (0, 0, 0, 0)))  # vanished between listing and stat: check() reports it
        return tuple(found)

    def check_cached(self) -> tuple[int, list[str]]:
        """(number of templates, check() of all of them), re-checked only when the fingerprint changed.

        For /health, which asks every few seconds: an unchanged library costs one stat per file.
        """
        fingerprint = self.fingerprint()
        with self._lock:
            cached = self._checked
        if cached is not None and cached[0] == fingerprint:
            return len(fingerprint), list(cached[1])
        errors = self.check([name for name, _ in fingerprint])
        with self._lock:
            self._checked = (fingerprint, errors)
        return len(fingerprint), list(errors)

    def _check_variants(self, names: list[str]) -> list[str]:
        """A variant needs its base template and must answer in the same format (the app reads it)."""
        errors: list[str] = []
        for full in names:
            folder, _, stem = full.rpartition("/")
            if VARIANT_SEP not in stem:
                continue
            base = (folder + "/" if folder else "") + stem.split(VARIANT_SEP, 1)[0]
            if not self._path_for(base).is_file():
                errors.append(f"{full}: a variant of {base!r}, but there is no {self._path_for(base)}")
                continue
            try:
                base_tpl, tpl = self.get(base), self.get(full)
            except PromptError:
                continue  # the render loop of check() reports the broken file itself
            if tpl.response_format != base_tpl.response_format:
                errors.append(
                    f"{full}: response_format {tpl.response_format!r} differs from {base!r}'s "
                    f"{base_tpl.response_format!r}; the app reads both the same way"
                )
        return errors


_libraries: dict[Path, PromptLibrary] = {}
_libraries_lock = threading.Lock()


def library_for(root: Path | str) -> PromptLibrary:
    """One shared library per folder, so its cache is shared too."""
    key = Path(root).resolve()
    with _libraries_lock:
        lib = _libraries.get(key)
        if lib is None:
            lib = _libraries[key] = PromptLibrary(key)
        return lib


def default_library() -> PromptLibrary:
    """The library at $PROMPTS_DIR, else <project>/settings."""
    return library_for(os.environ.get("PROMPTS_DIR") or PROJECT_ROOT / "settings")
