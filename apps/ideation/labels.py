"""StepIdeator's UI labels and the dispatch table.

The frontend dispatches on the Chinese labels byte for byte; stable English ids are
accepted as aliases so new clients need not send Chinese.
"""

from __future__ import annotations

# AI-assistant stages (selectedButtonInfo.aiStage / currentAIStage)
AI_BRIEF = "设计摘要的辅助生成"
AI_SKETCH = "草图的辅助生成"
AI_MODEL = "模型图的辅助生成"
AI_RENDERING = "场景与产品渲染图的辅助生成"

# workspace stages (currentStage)
STAGE_NOT_READY = "准备"
STAGE_UNABLE = "禁止"
STAGE_BRIEF = "设计摘要的环境"
STAGE_SKETCH = "草图的环境"
STAGE_MODEL = "模型图的环境"
STAGE_RENDERING = "场景与产品渲染图的环境"
STAGE_FINISH = "完成"

AI_STAGE_ALIASES = {"brief": AI_BRIEF, "sketch": AI_SKETCH, "model": AI_MODEL, "rendering": AI_RENDERING}
STAGE_ALIASES = {
    "brief": STAGE_BRIEF,
    "sketch": STAGE_SKETCH,
    "model": STAGE_MODEL,
    "rendering": STAGE_RENDERING,
    "not_ready": STAGE_NOT_READY,
    "unable": STAGE_UNABLE,
    "finish": STAGE_FINISH,
}

# (aiStage, buttonText) -> operation id; English ids: "<stage>.<button>"
DISPATCH: dict[tuple[str, str], str] = {
    (AI_BRIEF, "生成全新摘要"): "brief.new",
    (AI_BRIEF, "现有产品参考"): "brief.reference",
    (AI_BRIEF, "扩展/增加"): "brief.extend",
    (AI_SKETCH, "生成全新草图"): "sketch.new",
    (AI_SKETCH, "现有产品参考"): "sketch.reference",
    (AI_SKETCH, "扩展/添加"): "sketch.extend",
    (AI_SKETCH, "转换为草图"): "sketch.convert",
    (AI_MODEL, "生成全新模型"): "model.new",
    (AI_MODEL, "多角度拓展"): "model.multiview",
    (AI_MODEL, "转化为白模图"): "model.convert",
    (AI_RENDERING, "生成全新场景"): "rendering.new",
    (AI_RENDERING, "现有产品参考"): "rendering.reference",
    (AI_RENDERING, "扩展至场景"): "rendering.extend",
    (AI_RENDERING, "转化为渲染图"): "rendering.convert",
}
OPERATIONS = frozenset(DISPATCH.values())

# the original's business messages (the frontend shows a generic toast; researchers read these)
MSG_INVALID_TASK = "无效的任务类型"
MSG_TASK_MISSING = "设计任务缺失"
MSG_NUM_MISSING = "设计数量缺失"
MSG_TEXTS_MISSING = "用户选择文本缺失"
MSG_IMAGE_MISSING = "参考图像缺失"
MSG_IMAGE_OR_TEXT_MISSING = "参考图像或文本缺失"
MSG_WRONG_STAGE = "用户阶段错误"
MSG_USER_EMPTY = "用户名字为空"


def resolve_operation(ai_stage: str, button: str) -> str | None:
    """Map the pressed button to an operation id, accepting the English aliases."""
    stage = AI_STAGE_ALIASES.get(ai_stage, ai_stage)
    op = DISPATCH.get((stage, button))
    if op:
        return op
    english = button if "." in button else f"{ai_stage}.{button}"
    return english if english in OPERATIONS else None


def resolve_stage(stage: str | None) -> str | None:
    if stage is None:
        return None
    return STAGE_ALIASES.get(stage, stage)
