"""Request and response models of the refinement app (InsPilot's contract plus our history/refine routes).

`/generate` is a discriminated union on `type`: each type has its own `prompts` model and its
own business checks (the original's messages, status 400). The union runs in the original's
order: first the body's shape (`appid`/`type`/`prompts` typed: 422 like any body), then
`appid` and `type` (business messages), then the type's `prompts` (422 naming the fields,
`prompts.num: ...`), then its business checks. Counts are bounded (the original accepted any `int()`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, model_validator
from pydantic_core.core_schema import ValidatorFunctionWrapHandler

from apps.core.envelope import BusinessException
from apps.core.mongo_keys import StorableDict
from apps.core.openapi import body_example
from apps.core.query_models import QueryModel
from apps.core.storage import ID_PATTERN

from . import labels

MAX_NUM = 12  # type 0 `num`, type 3 `num`, type 2 `selectNum`
MAX_SCHEMES = 32  # type 2 schemes (rapid + deep sketches)
MAX_SELECTED = 16  # type 3 selectedSchemes
MAX_CONVERGENCE_TOTAL = 16  # type 3: selectedSchemes x num (two images each)
MAX_TEXTS = 50
MAX_IMAGE_CHARS = 14_000_000  # a base64 canvas export (~10 MB of PNG)

USERNAME_PATTERN = r"^[^\x00-\x1f\x7f/\\]{0,64}$"
SESSION_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
OBJECT_ID_PATTERN = r"^[0-9a-f]{24}$"

Text = Annotated[str, Field(max_length=500)]
Language = Literal["zh", "en"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


def nested_error(exc: ValidationError, prefix: str, *, skip: int = 0) -> BusinessException:
    """A nested payload's validation failure as a 422 envelope naming the fields (`prompts.num: ...`).

    `skip`: leading location parts that are not inside the payload (a union's tag and the field name).
    """
    parts = []
    for err in exc.errors(include_url=False, include_context=False)[:5]:
        where = ".".join([prefix, *(str(p) for p in tuple(err.get("loc", ()))[skip:])])
        parts.append(f"{where}: {err.get('msg', '')}")
    return BusinessException(1, "invalid request: " + "; ".join(parts), status=422)


def texts(values: list[str] | None) -> list[str]:
    """The non-empty texts, trimmed (the frontend sends empty labels of deleted text boxes)."""
    return [t.strip() for t in values or [] if t and t.strip()]


# ------------------------------------------------------------------ /generate
class _Prompts(_Strict):
    language: Language | None = Field(
        default=None, description="prompt language; default REFINEMENT_LANGUAGE"
    )
    username: str | None = Field(default=None, pattern=USERNAME_PATTERN, description="optional attribution")
    sessionId: str | None = Field(default=None, pattern=SESSION_PATTERN, description="optional attribution")


class RapidPrompts(_Prompts):
    """type 0: `num` pairs of scene image + concept text for the design task."""

    task: str | None = Field(default=None, max_length=2000, description="the design task")
    num: int | None = Field(
        default=None, ge=0, le=MAX_NUM, description="how many stimuli (the frontend sends 6)"
    )


class DeepPrompts(_Prompts):
    """type 1: three deep stimuli for one rapid-divergence sketch (seed-003 form: texts + schemeId only)."""

    designTask: str | None = Field(default=None, max_length=2000)
    designTexts: list[Text] | None = Field(
        default=None, max_length=MAX_TEXTS, description="the text labels on the sketch"
    )
    schemeId: int | None = Field(
        default=None, ge=0, le=100_000, description="index of the sketch; echoed back"
    )
    designImage: str | None = Field(
        default=None,
        max_length=MAX_IMAGE_CHARS,
        description="the sketch as a PNG data URL (or raw base64); optional",
    )


class SchemeIn(_Strict):
    designTexts: list[Text] = Field(default_factory=list, max_length=MAX_TEXTS)
    designImage: str | None = Field(default=None, max_length=MAX_IMAGE_CHARS)


class ConvergenceNamesPrompts(_Prompts):
    """type 2: a name for every scheme and the `selectNum` recommended ones."""

    designTask: str | None = Field(default=None, max_length=2000)
    selectNum: int = Field(
        ge=1, le=MAX_NUM, description="how many to recommend (clamped to the scheme count)"
    )
    schemes: list[SchemeIn] | None = Field(default=None, max_length=MAX_SCHEMES)


class SchemeTexts(_Strict):
    designTexts: list[Text] = Field(default_factory=list, max_length=MAX_TEXTS)


class ConvergencePrompts(_Prompts):
    """type 3: `num` scene + product + function stimuli per selected scheme."""

    selectedSchemes: list[SchemeTexts] | None = Field(default=None, max_length=MAX_SELECTED)
    num: int | None = Field(default=None, ge=0, le=MAX_NUM)


class _GenerateFields(_Strict):
    appid: int = Field(description="application id; only 0 (the paint app) exists")
    username: str | None = Field(
        default=None,
        pattern=USERNAME_PATTERN,
        description="optional (not sent by the original frontend): whose stimuli these are",
    )
    sessionId: str | None = Field(
        default=None, pattern=SESSION_PATTERN, description="optional: the session from /paint/start"
    )


class _GenerateHead(_GenerateFields):
    """The shape every type shares, checked before the type is known (the original's first checks)."""

    type: int
    prompts: dict[str, Any]


class RapidRequest(_GenerateFields):
    """type 0: rapid divergence."""

    type: Literal[0]
    prompts: RapidPrompts

    @model_validator(mode="after")
    def _original_checks(self) -> Self:
        if not (self.prompts.task or "").strip():
            raise BusinessException(1, labels.MSG_TASK_MISSING)
        if not self.prompts.num:
            raise BusinessException(1, labels.MSG_NUM_MISSING)
        return self


class DeepRequest(_GenerateFields):
    """type 1: deep divergence of one sketch."""

    type: Literal[1]
    prompts: DeepPrompts

    @model_validator(mode="after")
    def _original_checks(self) -> Self:
        image = (self.prompts.designImage or "").strip()
        if self.prompts.designTask is None and image:  # HEAD form without its task (seed 003 sends neither)
            raise BusinessException(1, labels.MSG_TASK_MISSING)
        if not texts(self.prompts.designTexts):
            raise BusinessException(1, labels.MSG_TEXTS_MISSING)
        if self.prompts.schemeId is None:
            raise BusinessException(1, labels.MSG_SCHEME_ID_MISSING)
        return self


class ConvergenceNamesRequest(_GenerateFields):
    """type 2: convergence naming + recommendation."""

    type: Literal[2]
    prompts: ConvergenceNamesPrompts

    @model_validator(mode="after")
    def _original_checks(self) -> Self:
        if self.prompts.designTask is not None and not self.prompts.designTask.strip():
            raise BusinessException(1, labels.MSG_DESCRIPTION_MISSING)
        if not self.prompts.schemes:
            raise BusinessException(1, labels.MSG_SCHEMES_MISSING)
        return self


class ConvergenceRequest(_GenerateFields):
    """type 3: convergence stimuli."""

    type: Literal[3]
    prompts: ConvergencePrompts

    @model_validator(mode="after")
    def _original_checks(self) -> Self:
        schemes, num = self.prompts.selectedSchemes, self.prompts.num
        if not schemes:
            raise BusinessException(1, labels.MSG_SCHEMES_MISSING)
        if not num:
            raise BusinessException(1, labels.MSG_NUM_MISSING)
        if len(schemes) * num > MAX_CONVERGENCE_TOTAL:
            raise BusinessException(
                1,
                f"invalid request: prompts.selectedSchemes x prompts.num must be at most {MAX_CONVERGENCE_TOTAL}"
                f" (got {len(schemes)} x {num})",
                status=422,
            )
        return self


GenerateRequest = RapidRequest | DeepRequest | ConvergenceNamesRequest | ConvergenceRequest


def _union_body_example(example: dict[str, Any]) -> dict[str, Any]:
    """`body_example`, with the union published without OpenAPI's `discriminator`: that keyword's mapping
    keys are strings, our `type` is an integer (each branch still pins it with `const`), and schemathesis
    cannot generate a body that satisfies both."""
    config = body_example(example)
    extra = config["json_schema_extra"]

    def publish(schema: dict[str, Any]) -> None:
        schema.update(extra)
        schema.pop("discriminator", None)

    return {**config, "json_schema_extra": publish}


class GenerateBody(RootModel[Annotated[GenerateRequest, Field(discriminator="type")]]):
    """`POST /generate`: every stimulus request of InsPilot, one model per `type`."""

    model_config = ConfigDict(
        title="RefinementGenerateBody",  # unique in /openapi.json (ideation has a GenerateBody too)
        **_union_body_example({"appid": 0, "type": 0, "prompts": {"task": "设计一款运动辅助产品", "num": 6}}),
    )

    @model_validator(mode="wrap")
    @classmethod
    def _in_original_order(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(data, cls):
            return data
        head = _GenerateHead.model_validate(data)  # a ValidationError: the usual 422 of a bad body
        if head.appid != labels.APP_PAINT:
            raise BusinessException(1, labels.MSG_APP_MISSING)
        if head.type not in labels.TYPE_STAGES:
            raise BusinessException(1, labels.MSG_INVALID_TYPE)
        try:
            return handler({**data, "appid": head.appid, "type": head.type})
        except ValidationError as exc:  # only `prompts` can fail here: the head passed
            raise nested_error(exc, "prompts", skip=2) from exc  # (tag, "prompts", ...)


class Item(BaseModel):
    type: str = Field(
        description="abstractText | concreteText | abstractImage | concreteImage | groupTypeOne | "
        "groupTypeTwo"
    )
    text: str | None = None
    image: str | None = Field(default=None, description="raw base64 PNG (no data: prefix)")
    combinations: list[Item] | None = None


class Creative(BaseModel):
    type: int = Field(description="0 rapid, 2 deep, 4 convergence group two")
    displayType: Literal["sequence", "direct"]
    items: list[Item]


class GenerateData(BaseModel):
    """type 0: count + result; 1: schemeId + count + result; 2: names + selected; 3: result."""

    count: int | None = None
    schemeId: int | None = None
    result: list[Creative] | None = None
    names: list[str] | None = None
    selected: list[str] | None = None
    requestId: str = Field(description="ours: the stored request (GET /requests/<id>)")
    stimulusIds: list[str] | None = Field(
        default=None, description="ours: one per stored stimulus, type 2 included (GET /stimuli/<id>)"
    )


class Envelope(BaseModel):
    success: bool
    code: int = Field(description="0 ok, 1 business/validation failure, 2 model failure")
    message: str
    data: Any = None


class GenerateEnvelope(Envelope):
    data: GenerateData | None = None


# ------------------------------------------------------------------ /paint
class UsernameBody(_Strict):
    model_config = ConfigDict(title="RefinementUsernameBody", **body_example({"username": "alice"}))

    username: str | None = Field(default=None, pattern=USERNAME_PATTERN)


class SaveBody(_Strict):
    model_config = ConfigDict(
        title="RefinementSaveBody",
        **body_example(
            {
                "username": "alice",
                "data": {
                    "designSchemes": {
                        "快速发散": [{"name": "", "paths": [], "texts": [], "canvasImage": ""}]
                    },
                    "designTask": "设计一款运动辅助产品",
                    "currentStage": "快速发散",
                },
            }
        ),
    )

    username: str | None = Field(default=None, pattern=USERNAME_PATTERN)
    data: StorableDict | None = Field(  # the schemes are stored as sent
        default=None, description="{designSchemes: {stage: [Scheme]}, designTask, currentStage}"
    )


class SaveData(_Strict):
    designSchemes: dict[str, list[dict[str, Any]] | None] | None = None
    designTask: str | None = Field(default=None, max_length=2000)
    currentStage: str | None = Field(default=None, max_length=20)


class UserState(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    id: str = Field(alias="_id")
    username: str
    currentStage: str
    designTask: str
    rapidDivergenceSchemes: list[dict[str, Any]]
    deepDivergenceSchemes: list[dict[str, Any]]
    convergenceSchemes: list[dict[str, Any]]
    sessionId: str = Field(
        description="ours: this login's session (send it back as `sessionId` to attribute /generate calls)"
    )


class UserStateEnvelope(Envelope):
    data: UserState | None = None


# ------------------------------------------------------------------ history
class UserPath(BaseModel):
    username: str = Field(pattern=r"^[^\x00-\x1f\x7f/\\]{1,64}$")


class SessionPath(BaseModel):
    session_id: str = Field(pattern=SESSION_PATTERN)


class StimulusPath(BaseModel):
    stimulus_id: str = Field(pattern=OBJECT_ID_PATTERN)


class RequestPath(BaseModel):
    request_id: str = Field(pattern=OBJECT_ID_PATTERN)


class ImageIdPath(BaseModel):
    image_id: str = Field(pattern=f"^{ID_PATTERN}$")


class LimitQuery(QueryModel):
    limit: int = Field(default=50, ge=1, le=500)


class StimuliQuery(QueryModel):
    sessionId: str | None = Field(default=None, pattern=SESSION_PATTERN)
    type: int | None = Field(default=None, ge=0, le=3, description="only this /generate type")
    before: str | None = Field(
        default=None, pattern=OBJECT_ID_PATTERN, description="page: stimuli older than this id"
    )
    limit: int = Field(default=50, ge=1, le=200)


class HistoryItem(BaseModel):
    type: str
    text: str | None = None
    imageId: str | None = None
    imageUrl: str | None = None
    combinations: list[HistoryItem] | None = None


class StimulusOut(BaseModel):
    id: str
    requestId: str
    username: str | None
    sessionId: str | None
    attribution: str = Field(description="auth | explicit | inferred | anonymous")
    type: int = Field(description="the /generate type")
    stage: str
    index: int
    creativeType: int | None = None
    displayType: str | None = None
    items: list[HistoryItem] = Field(default_factory=list)
    result: dict[str, Any] | None = Field(default=None, description="type 2: names, selected")
    texts: dict[str, Any] = Field(
        default_factory=dict, description="the chain that led to it (product, scene, ...)"
    )
    images: list[dict[str, Any]] = Field(default_factory=list, description="prompts and ids of its images")
    provenance: dict[str, Any] = Field(
        default_factory=dict, description="step -> template, hash, generation id"
    )
    language: str
    createdAt: str


class StimuliPage(BaseModel):
    stimuli: list[StimulusOut]
    next: str | None = Field(default=None, description="pass as `before` for the next page")


class StimuliEnvelope(Envelope):
    data: StimuliPage | None = None


class SessionsEnvelope(Envelope):
    data: dict[str, Any] | None = None


# ------------------------------------------------------------------ refine (ours)
class _RefineBody(_Strict):
    imageId: str = Field(pattern=f"^{ID_PATTERN}$", description="a stimulus image or an earlier version")
    prompt: str | None = Field(
        default=None, max_length=1000, description="positive prompt; default: the parent's"
    )
    negativePrompt: str | None = Field(default=None, max_length=1000, description="default: the parent's")
    num: int = Field(default=1, ge=1, le=4, description="how many variations (siblings)")
    seed: int = Field(default=-1, ge=-1, le=2**32 - 1)
    username: str | None = Field(
        default=None, pattern=USERNAME_PATTERN, description="default: the parent's owner"
    )
    sessionId: str | None = Field(
        default=None, pattern=SESSION_PATTERN, description="default: the parent's session"
    )


class Img2ImgBody(_RefineBody):
    """A variation of an image: img2img with `strength` (0 = unchanged, 1 = new image)."""

    model_config = ConfigDict(
        **body_example(
            {"imageId": "Xk3v9QeL0aBcDeFgHiJkLmNo", "prompt": "a foldable jump rope", "strength": 0.5}
        )
    )

    strength: float | None = Field(
        default=None, ge=0.0, le=1.0, description="denoising strength; default 0.6"
    )


class InpaintBody(_RefineBody):
    """Regenerate the masked part of an image."""

    model_config = ConfigDict(
        **body_example(
            {
                "imageId": "Xk3v9QeL0aBcDeFgHiJkLmNo",
                "mask": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8"
                "/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg==",
                "prompt": "a red handle",
            }
        )
    )

    mask: str = Field(
        min_length=8,
        max_length=MAX_IMAGE_CHARS,
        description="PNG (raw base64 or data URL), same size as the image; white = regenerate",
    )
    invertMask: bool = Field(default=False, description="regenerate the black part instead")
    strength: float | None = Field(
        default=None, ge=0.0, le=1.0, description="denoising strength; default 0.75"
    )


class VersionOut(BaseModel):
    id: str = Field(description="the version's image id")
    parentId: str | None
    rootId: str
    stimulusId: str | None
    op: str = Field(description="original | img2img | inpaint")
    depth: int
    prompt: str | None = None
    negativePrompt: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    imageUrl: str
    image: str | None = Field(default=None, description="raw base64 PNG (POST answers only)")
    createdAt: str | None = None
    children: list[VersionOut] | None = None


class RefineData(BaseModel):
    parentId: str
    rootId: str
    versions: list[VersionOut]


class RefineEnvelope(Envelope):
    data: RefineData | None = None


class TreeEnvelope(Envelope):
    data: VersionOut | None = None
