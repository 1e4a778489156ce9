"""Request models of the storyteller app: StorAIteller's original fields plus a session id.

The original page sends `maincharacter, keywords, genre, registro, childsafe, maxnowords,
twist` (and `story` to /savestory/, `textbefore, textselected, textafter` to
/redopartstory/). We keep those names, validate them (the original took anything), and
accept the misspelt option values the page really sends ("Hystorical", "Mistery", "Sci-Fy"),
mapping them to correct words for the prompt.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from apps.core.openapi import body_example
from apps.core.query_models import QueryModel

SESSION_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
VERSION_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
MAX_WORDS_LIMIT = 5000  # hard schema bound; STORYTELLER_MAX_WORDS may lower it
MAX_STORY_CHARS = 200_000

# value accepted (lower-cased) -> word used in the prompt. The page's misspellings and the
# README's ("Scy-fy") are accepted next to the correct spellings.
GENRES: dict[str, str] = {
    "adventure": "Adventure",
    "biography": "Biography",
    "comedy": "Comedy",
    "drama": "Drama",
    "fantasy": "Fantasy",
    "gothic": "Gothic",
    "historical": "Historical",
    "hystorical": "Historical",
    "horror": "Horror",
    "mystery": "Mystery",
    "mistery": "Mystery",
    "quirky": "Quirky",
    "romance": "Romance",
    "sci-fi": "Science fiction",
    "sci-fy": "Science fiction",
    "scy-fy": "Science fiction",
    "scy-fi": "Science fiction",
    "science fiction": "Science fiction",
    "thriller": "Thriller",
    "tragedy": "Tragedy",
    "war": "War",
}
REGISTERS: dict[str, str] = {
    name.lower(): name
    for name in (
        "Casual",
        "Cerebral",
        "Conversational",
        "Descriptive",
        "Direct",
        "Elegant",
        "Formal",
        "Irreverent",
        "Playful",
        "Vivid",
    )
}
# what the page offers, in order: (value sent, label shown)
GENRE_OPTIONS = [
    ("Adventure", "Adventure"),
    ("Biography", "Biography"),
    ("Comedy", "Comedy"),
    ("Drama", "Drama"),
    ("Fantasy", "Fantasy"),
    ("Gothic", "Gothic"),
    ("Historical", "Historical"),
    ("Horror", "Horror"),
    ("Mystery", "Mystery"),
    ("Quirky", "Quirky"),
    ("Romance", "Romance"),
    ("Sci-Fi", "Science fiction"),
    ("Thriller", "Thriller"),
    ("Tragedy", "Tragedy"),
    ("War", "War"),
]
REGISTER_OPTIONS = list(REGISTERS.values())


def canonical_genre(value: str) -> str:
    """The word the prompt uses for a genre value (ValueError for an unknown one)."""
    key = " ".join(value.split()).lower()
    if key not in GENRES:
        raise ValueError(f"unknown genre {value!r}; one of: {', '.join(v for v, _ in GENRE_OPTIONS)}")
    return GENRES[key]


def canonical_register(value: str) -> str:
    key = " ".join(value.split()).lower()
    if key not in REGISTERS:
        raise ValueError(f"unknown register {value!r}; one of: {', '.join(REGISTER_OPTIONS)}")
    return REGISTERS[key]


SETTINGS_EXAMPLE: dict[str, Any] = {
    "maincharacter": "Mia, Leo",
    "keywords": "lighthouse, storm",
    "genre": "Mystery",
    "registro": "Vivid",
    "childsafe": True,
    "maxnowords": 200,
    "twist": False,
}


class SessionField(BaseModel):
    """Every call may name its session; otherwise the cookie (or this client's last session) is used."""

    model_config = ConfigDict(**body_example({"session": "tab3f9c2a7d1e"}))

    session: str | None = Field(
        default=None,
        pattern=SESSION_PATTERN,
        description="session id (also accepted as the cookie or ?session=)",
    )


class StorySettings(SessionField):
    """`POST /setstory/`: the settings form (the original `Payload`)."""

    model_config = ConfigDict(extra="ignore", **body_example(SETTINGS_EXAMPLE))

    maincharacter: str = Field(
        min_length=1, max_length=300, description="main characters' names, comma-separated"
    )
    keywords: str = Field(min_length=1, max_length=300, description="story keywords, comma-separated")
    genre: str = Field(
        max_length=40,
        description="Adventure, Biography, ... (the page's 'Hystorical', 'Mistery', 'Sci-Fy' are accepted)",
    )
    registro: str = Field(max_length=40, description="register: Casual, Cerebral, Conversational, ...")
    childsafe: StrictBool = Field(description="child-friendly content")
    maxnowords: int = Field(ge=1, le=MAX_WORDS_LIMIT, description="maximum number of words (1-5000)")
    twist: StrictBool = Field(description="the finale must have a twist")

    @field_validator("maincharacter", "keywords")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("must not be blank")
        return value

    @field_validator("genre")
    @classmethod
    def _genre(cls, value: str) -> str:
        canonical_genre(value)
        return value.strip()

    @field_validator("registro")
    @classmethod
    def _register(cls, value: str) -> str:
        canonical_register(value)
        return value.strip()

    def prompt_variables(self) -> dict[str, Any]:
        return {
            "characters": self.maincharacter,
            "keywords": self.keywords,
            "genre": canonical_genre(self.genre),
            "register": canonical_register(self.registro),
            "max_words": self.maxnowords,
            "child_friendly": self.childsafe,
            "twist": self.twist,
        }

    def stored(self) -> dict[str, Any]:
        """The settings as sent (plus the corrected words), kept with every version."""
        return {
            "maincharacter": self.maincharacter,
            "keywords": self.keywords,
            "genre": self.genre,
            "registro": self.registro,
            "childsafe": self.childsafe,
            "maxnowords": self.maxnowords,
            "twist": self.twist,
            "genre_label": canonical_genre(self.genre),
            "register_label": canonical_register(self.registro),
        }


class SaveStoryBody(StorySettings):
    """`POST /savestory/`: the settings form + the story shown (the original `Payloadsavestory`)."""

    model_config = ConfigDict(
        **body_example({**SETTINGS_EXAMPLE, "story": "Mia kept the lighthouse on the rock."})
    )

    story: str = Field(
        max_length=MAX_STORY_CHARS, description="the story in the textarea (newlines may be removed)"
    )
    version: str | None = Field(
        default=None,
        pattern=VERSION_PATTERN,
        description="the version that was shown (default: the session's current one)",
    )


class StoryParts(SessionField):
    """`POST /redopartstory/`: the story split around the selection (the original `Storyparts`)."""

    model_config = ConfigDict(
        extra="ignore",
        **body_example(
            {
                "textbefore": "Mia kept the lighthouse. ",
                "textselected": "One night the storm put out the lamp.",
                "textafter": " Leo lit it again.",
            }
        ),
    )

    textbefore: str = Field(max_length=MAX_STORY_CHARS)
    textselected: str = Field(max_length=MAX_STORY_CHARS)
    textafter: str = Field(max_length=MAX_STORY_CHARS)
    version: str | None = Field(
        default=None,
        pattern=VERSION_PATTERN,
        description="the version the parts come from (checked when given)",
    )


class RewriteBody(SessionField):
    """`POST /api/rewrite`: select a part of a version, by the three texts or by offsets."""

    model_config = ConfigDict(**body_example({"session": "tab3f9c2a7d1e", "start": 25, "end": 62}))

    version: str | None = Field(
        default=None, pattern=VERSION_PATTERN, description="default: the current version"
    )
    textbefore: str | None = Field(default=None, max_length=MAX_STORY_CHARS)
    textselected: str | None = Field(default=None, max_length=MAX_STORY_CHARS)
    textafter: str | None = Field(default=None, max_length=MAX_STORY_CHARS)
    start: int | None = Field(default=None, ge=0, description="selection start (characters, code points)")
    end: int | None = Field(default=None, ge=0, description="selection end (exclusive)")

    @model_validator(mode="after")
    def _one_way(self) -> RewriteBody:
        texts = (self.textbefore, self.textselected, self.textafter)
        if all(t is not None for t in texts):
            return self
        if self.start is not None and self.end is not None:
            if self.end <= self.start:
                raise ValueError("end must be greater than start")
            return self
        raise ValueError("give textbefore, textselected and textafter, or start and end")


class EditBody(SessionField):
    """`POST /api/edit`: store a manually edited story as a new version."""

    model_config = ConfigDict(
        **body_example({"session": "tab3f9c2a7d1e", "text": "Mia kept the lighthouse alone."})
    )

    text: str = Field(min_length=1, max_length=MAX_STORY_CHARS)
    parent: str | None = Field(
        default=None, pattern=VERSION_PATTERN, description="the version that was edited"
    )


class FeedbackBody(SessionField):
    """`POST /api/feedback`: "Good story" for the exact version shown."""

    model_config = ConfigDict(**body_example({"session": "tab3f9c2a7d1e", "good": True}))

    version: str | None = Field(
        default=None, pattern=VERSION_PATTERN, description="default: the current version"
    )
    good: StrictBool = True
    comment: str | None = Field(default=None, max_length=2000)


class SessionQuery(QueryModel):
    session: str | None = Field(default=None, pattern=SESSION_PATTERN)


class StreamQuery(SessionQuery):
    format: Literal["text", "json"] = Field(
        default="text",
        description="WebSocket only: raw text frames (default) or JSON messages",
    )
    action: Literal["next", "story"] = Field(
        default="next",
        description="next: the pending part rewrite if any, else the story; story: the whole story",
    )


class VersionPath(BaseModel):
    version_id: str = Field(pattern=VERSION_PATTERN)
