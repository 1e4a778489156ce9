"""Request models of the ideation app (StepIdeator's frontend contract)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from apps.core.mongo_keys import StorableDict, check_storable_keys
from apps.core.openapi import body_example
from apps.core.query_models import QueryModel

# letters/digits (incl. CJK), dot, dash, underscore; empty allowed (the original frontend may send "")
USERNAME_PATTERN = r"^[\w.\-]{0,64}$"


class ButtonInfo(BaseModel):
    buttonText: str = Field(
        max_length=40, description="the pressed button's label (Chinese, or an English id)"
    )
    aiStage: str = Field(
        max_length=40, description="the AI stage the button belongs to (Chinese, or an English id)"
    )


class GenerateBody(BaseModel):
    """`POST /generate`: every AI button of StepIdeator."""

    model_config = ConfigDict(
        extra="allow",
        title="IdeationGenerateBody",  # unique in /openapi.json (refinement has a GenerateBody too)
        **body_example(
            {
                "username": "10",
                "designTask": "设计一款适用于丘陵果园的农业植保无人机",
                "currentNum": 2,
                "currentAIStage": "设计摘要的辅助生成",
                "currentStage": "设计摘要的环境",
                "selectedTexts": [],
                "selectedCanvasRecords": [],
                "selectedButtonInfo": {"buttonText": "生成全新摘要", "aiStage": "设计摘要的辅助生成"},
            }
        ),
    )

    username: str = Field(default="", pattern=USERNAME_PATTERN, description="participant id")
    designTask: str = Field(default="", max_length=2000)
    currentNum: int = Field(
        default=1, ge=0, le=64, description="how many outputs (bounded by IDEATION_MAX_NUM)"
    )
    currentAIStage: str | None = Field(default=None, max_length=40)
    currentStage: str | None = Field(default=None, max_length=40)
    selectedTexts: list[str] | None = Field(default=None, max_length=50)
    selectedCanvasRecords: list[str] | None = Field(
        default=None, max_length=4, description="[] or one image: a URL from /upload or a data URL"
    )
    selectedButtonInfo: ButtonInfo


class UsernameBody(BaseModel):
    model_config = ConfigDict(title="IdeationUsernameBody", **body_example({"username": "10"}))

    username: str | None = Field(default=None, pattern=USERNAME_PATTERN)


class SaveBody(BaseModel):
    model_config = ConfigDict(
        title="IdeationSaveBody",
        **body_example(
            {
                "username": "10",
                "data": {
                    "designSchemes": {
                        "草图的环境": [
                            {
                                "name": "",
                                "paths": [],
                                "texts": [{"text": "可折叠机臂", "position": {"x": 412, "y": 300}}],
                                "canvasImage": "",
                            }
                        ]
                    },
                    "designTask": "设计一款适用于丘陵果园的农业植保无人机",
                    "currentStage": "草图的环境",
                },
            }
        ),
    )

    username: str | None = Field(default=None, pattern=USERNAME_PATTERN)
    data: StorableDict | None = None


class TimingEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    startTime: float
    duration: float | None = None


class TimeRecordBody(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        **body_example(
            {
                "username": "10",
                "stageSwitchRecords": {
                    "设计摘要的环境": [{"startTime": 1710396426000, "duration": 95000}],
                    "草图的环境": [{"startTime": 1710396521000}],
                },
                "aiStageSwitchRecords": {
                    "设计摘要的辅助生成": [{"startTime": 1710396426000, "duration": 60000}]
                },
            }
        ),
    )
    username: str = Field(default="", pattern=USERNAME_PATTERN)
    stageSwitchRecords: dict[str, list[TimingEntry]] = Field(default_factory=dict)
    aiStageSwitchRecords: dict[str, list[TimingEntry]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        """The whole body is stored (extra keys too), so every key in it must be storable."""
        return check_storable_keys(data)


class UserPath(BaseModel):
    username: str = Field(pattern=r"^[\w.\-]{1,64}$")


class HistoryQuery(QueryModel):
    limit: int = Field(default=50, ge=1, le=500)
