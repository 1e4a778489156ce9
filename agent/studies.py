"""Studies: `settings/studies/<study>.yaml` names conditions; each participant gets one, once.

A condition picks prompt variants (`settings/<app>/<name>.<variant>.j2`) and model params. The
setting `STUDY=<study>` makes one study active. A participant is the authenticated user, or the
user/session an app attributes a call to when auth is off. The first time a participant appears
they are assigned a condition, stored in `study_participants` (unique per study + participant), so
the assignment holds across workers, hosts and restarts; every later call renders that condition's
variants and every record carries `study` and `condition`.

Balanced assignment is round robin in order of first appearance: the first writer of a participant
document (insert-if-absent on the unique index) draws the next number from a counter document
(`find_one_and_update` + `$inc`), so two workers seeing the same new participant at once neither
assign twice nor skip a number.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pymongo import ASCENDING, ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from agent.prompts import PromptError, PromptLibrary
from agent.prompts.library import check_params

log = logging.getLogger(__name__)

STUDIES_DIR = "studies"
PARTICIPANTS = "study_participants"
COUNTERS = "study_counters"
ASSIGNMENTS = ("balanced", "random", "fixed")
_STUDY_KEYS = ("description", "assignment", "conditions", "participants")
_CONDITION_KEYS = ("description", "templates", "params")


class StudyError(Exception):
    """A study file is broken or names templates/variants that do not exist; the message says which."""


@dataclass(frozen=True)
class Condition:
    """One arm of a study: template name -> variant, and model params that override the template's."""

    name: str
    templates: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    description: str | None = None


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    description: str
    assignment: str
    conditions: dict[str, Condition]  # in file order (the balanced round robin follows it)
    participants: dict[str, str] = field(default_factory=dict)  # assignment: fixed -> participant: condition


def studies_dir(prompts_root: Path | str) -> Path:
    return Path(prompts_root) / STUDIES_DIR


def study_names(prompts_root: Path | str) -> list[str]:
    folder = studies_dir(prompts_root)
    return sorted(p.stem for p in folder.glob("*.yaml") if p.is_file()) if folder.is_dir() else []


def _mapping(value: Any, where: str, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise StudyError(f"{where}: {what} must be a mapping of names")
    return value


def parse_study(name: str, path: Path, text: str) -> Study:
    """Check a study file's shape (not yet whether its templates exist: see `check_study`)."""
    where = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StudyError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    if not isinstance(data, dict):
        raise StudyError(f"{where}: a study is 'key: value' lines (description, assignment, conditions)")
    unknown = sorted(str(k) for k in data if k not in _STUDY_KEYS)
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_STUDY_KEYS)}")
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise StudyError(f"{where}: 'description' is required (one line saying what the study compares)")
    assignment = data.get("assignment") or "balanced"
    if assignment not in ASSIGNMENTS:
        raise StudyError(f"{where}: assignment must be one of {', '.join(ASSIGNMENTS)}, not {assignment!r}")
    raw = _mapping(data.get("conditions"), where, "'conditions'")
    if len(raw) < 1:
        raise StudyError(
            f"{where}: 'conditions' needs at least one condition, e.g. conditions: {{neutral: {{}}}}"
        )
    conditions: dict[str, Condition] = {}
    for cname, body in raw.items():
        cwhere = f"{where}: condition {cname!r}"
        body = _mapping(body, cwhere, "a condition")
        bad = sorted(k for k in body if k not in _CONDITION_KEYS)
        if bad:
            raise StudyError(
                f"{cwhere}: unknown key(s) {', '.join(bad)}; allowed: {', '.join(_CONDITION_KEYS)}"
            )
        templates = _mapping(body.get("templates"), cwhere, "'templates' (template name -> variant)")
        for tname, variant in templates.items():
            if not isinstance(variant, str) or not variant:
                raise StudyError(f"{cwhere}: templates.{tname} must name a variant, e.g. warm")
        try:
            params = check_params(body.get("params"), cwhere)
        except PromptError as exc:
            raise StudyError(str(exc)) from exc
        desc = body.get("description")
        conditions[cname] = Condition(cname, dict(templates), params, desc if isinstance(desc, str) else None)
    participants = {str(k): v for k, v in _mapping(data.get("participants"), where, "'participants'").items()}
    for who, cname in participants.items():
        if cname not in conditions:
            raise StudyError(f"{where}: participants.{who} names no condition {cname!r}")
    if assignment == "fixed" and not participants:
        raise StudyError(f"{where}: assignment: fixed needs 'participants' (participant -> condition)")
    return Study(name, path, description.strip(), assignment, conditions, participants)


def check_study(study: Study, library: PromptLibrary) -> list[str]:
    """Every template a condition names must exist, with the variant it names."""
    errors: list[str] = []
    for cond in study.conditions.values():
        for tname, variant in cond.templates.items():
            where = f"{study.path}: condition {cond.name!r}"
            try:
                library.get(tname)
            except PromptError as exc:
                errors.append(f"{where}: {exc}")
                continue
            if variant not in library.variants(tname):
                known = ", ".join(library.variants(tname)) or "none"
                errors.append(
                    f"{where}: template {tname!r} has no variant {variant!r} "
                    f"(expected the file {tname}.{variant}.j2; variants: {known})"
                )
    return errors


def load_study(prompts_root: Path | str, name: str, library: PromptLibrary | None = None) -> Study:
    """Read and check one study; with `library`, unknown templates or variants are errors too."""
    path = studies_dir(prompts_root) / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        known = ", ".join(study_names(prompts_root)) or "none"
        raise StudyError(f"unknown study {name!r}: no file {path} (studies: {known})")
    study = parse_study(name, path, path.read_text(encoding="utf-8"))
    errors = check_study(study, library) if library is not None else []
    if errors:
        raise StudyError("; ".join(errors))
    return study


def check_studies(
    prompts_root: Path | str, library: PromptLibrary, names: Iterable[str] | None = None
) -> list[str]:
    """One string per problem over every study file (for `flask prompts check`)."""
    errors: list[str] = []
    for name in names if names is not None else study_names(prompts_root):
        try:
            load_study(prompts_root, name, library)
        except StudyError as exc:
            errors.append(f"studies/{name}: {exc}")
    return errors


# ------------------------------------------------------------------------------------ assignment


@dataclass(frozen=True)
class Assignment:
    """What one call of one participant runs under."""

    study: str
    condition: str | None
    participant: str | None
    spec: Condition | None = None

    def variant(self, template: str | None) -> str | None:
        return self.spec.templates.get(template) if self.spec and template else None

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.spec.params) if self.spec else {}

    def fields(self) -> dict[str, Any]:
        return {"study": self.study, "condition": self.condition}


def participant_of(user: str | None, session: str | None) -> tuple[str, str] | None:
    """(kind, id): the user when known (auth on: always), else the session the call belongs to."""
    if user:
        return "user", str(user)
    if session:
        return "session", str(session)
    return None


def create_study_indexes(db: Database) -> None:
    db[PARTICIPANTS].create_index([("study", ASCENDING), ("participant", ASCENDING)], unique=True)
    db[PARTICIPANTS].create_index([("study", ASCENDING), ("n", ASCENDING)])


class StudyAssigner:
    """Assigns and looks up conditions for one study; safe across threads, workers and hosts."""

    def __init__(self, db: Database, study: Study, *, wait_s: float = 5.0) -> None:
        self.db = db
        self.study = study
        self.wait_s = wait_s
        self._cache: dict[str, str] = {}  # assignments never change once stored
        self._lock = threading.Lock()
        self._rng = random.SystemRandom()

    def _choose(self) -> tuple[str, int]:
        """Draw the next number from the study's counter (one atomic $inc) and map it to a condition."""
        names = list(self.study.conditions)
        counters = self.db[COUNTERS]
        doc = None
        for _ in range(50):
            doc = counters.find_one_and_update(
                {"_id": self.study.name}, {"$inc": {"n": 1}}, return_document=ReturnDocument.AFTER
            )
            if doc is not None:
                break
            try:  # first draw of this study: create the counter (a racing worker's insert wins just as well)
                counters.insert_one({"_id": self.study.name, "n": 0})
            except DuplicateKeyError:
                log.debug("study %s: counter created by another worker", self.study.name)
        if doc is None:
            raise PyMongoError(f"study {self.study.name}: could not draw from the assignment counter")
        n = int(doc["n"])
        if self.study.assignment == "random":
            return self._rng.choice(names), n
        return names[(n - 1) % len(names)], n

    def assign(self, participant: str, *, kind: str = "user", app: str | None = None) -> str:
        """The participant's condition, assigning one on first appearance. Raises PyMongoError."""
        with self._lock:
            cached = self._cache.get(participant)
        if cached is not None:
            return cached
        coll = self.db[PARTICIPANTS]
        key = {"study": self.study.name, "participant": participant}
        doc = coll.find_one(key)
        if doc is None:
            try:
                coll.insert_one(
                    {**key, "kind": kind, "app": app, "condition": None, "first_seen": datetime.now(UTC)}
                )
                doc = self._set_condition(key)
            except DuplicateKeyError:
                doc = coll.find_one(key)
        deadline = time.monotonic() + self.wait_s
        while doc is not None and doc.get("condition") is None and time.monotonic() < deadline:
            time.sleep(0.05)  # another worker inserted it and is drawing the number right now
            doc = coll.find_one(key)
        if doc is None or doc.get("condition") is None:
            doc = self._set_condition(key)  # that worker died between insert and update: finish its job
        condition = str(doc["condition"])
        with self._lock:
            self._cache[participant] = condition
        return condition

    def _set_condition(self, key: dict[str, Any]) -> dict[str, Any]:
        fixed = self.study.participants.get(key["participant"])
        if fixed is not None:
            condition, n = fixed, None
        else:
            condition, n = self._choose()
        doc = self.db[PARTICIPANTS].find_one_and_update(
            {**key, "condition": None},
            {"$set": {"condition": condition, "n": n, "assigned_at": datetime.now(UTC)}},
            return_document=ReturnDocument.AFTER,
        )
        return doc if doc is not None else (self.db[PARTICIPANTS].find_one(key) or {})

    def for_call(self, app: str | None, user: str | None, session: str | None) -> Assignment:
        """Never raises: a database problem gives condition None (logged), the call still runs."""
        who = participant_of(user, session)
        if who is None:
            return Assignment(self.study.name, None, None)
        kind, participant = who
        try:
            condition = self.assign(participant, kind=kind, app=app)
        except PyMongoError:
            log.exception(
                "study %s: could not assign %s; the call runs without a condition",
                self.study.name,
                participant,
            )
            return Assignment(self.study.name, None, participant)
        spec = self.study.conditions.get(condition)
        if spec is None:
            log.warning(
                "study %s: %s is in condition %r, which the study file no longer has",
                self.study.name,
                participant,
                condition,
            )
        return Assignment(self.study.name, condition, participant, spec)

    def annotate(self, doc: dict[str, Any]) -> dict[str, Any]:
        """For GenerationRecorder: study + condition of the record's participant (unless already set)."""
        if doc.get("condition") is not None:
            return {}
        return self.for_call(doc.get("app"), doc.get("user"), doc.get("session")).fields()

    def summary(self) -> dict[str, Any]:
        """Participants per condition (and per app) for `flask study summary` and the dashboard."""
        rows = self.db[PARTICIPANTS].aggregate(
            [
                {"$match": {"study": self.study.name}},
                {"$group": {"_id": {"condition": "$condition", "app": "$app"}, "n": {"$sum": 1}}},
            ]
        )
        out: dict[str, Any] = {c: {"participants": 0, "apps": {}} for c in self.study.conditions}
        for row in rows:
            entry = out.setdefault(str(row["_id"].get("condition")), {"participants": 0, "apps": {}})
            entry["participants"] += row["n"]
            app = str(row["_id"].get("app"))
            entry["apps"][app] = entry["apps"].get(app, 0) + row["n"]
        return out
