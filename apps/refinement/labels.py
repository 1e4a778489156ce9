"""InsPilot's vocabulary: business messages, stages, creative and item types.

The frontend (LBruyne/InsPilot) matches these strings byte for byte, so they live in
one place and the tests import them from here.
"""

from __future__ import annotations

APP = "refinement"
APP_PAINT = 0  # the only `appid` of the original

# the original's business messages (research note §1.0)
MSG_APP_MISSING = "应用不存在"
MSG_INVALID_TYPE = "无效的任务类型"
MSG_TASK_MISSING = "设计任务缺失"
MSG_NUM_MISSING = "设计数量缺失"
MSG_TEXTS_MISSING = "设计文本缺失"
MSG_SCHEME_ID_MISSING = "关联方案缺失"
MSG_DESCRIPTION_MISSING = "方案描述缺失"
MSG_SCHEMES_MISSING = "设计方案缺失"
MSG_USER_EMPTY = "用户名字为空"
MSG_USER_OR_DATA_EMPTY = "用户名字或数据为空"
MSG_USER_MISSING = "用户不存在"

# ours: one message per kind for "missing" and "not yours" alike (the 404 bodies must not tell them apart)
SESSION_NOT_FOUND = "session not found"
STIMULUS_NOT_FOUND = "stimulus not found"
REQUEST_NOT_FOUND = "request not found"

# frontend Stage enum values used here (also what /paint/save stores in currentStage; its 禁止 and 完成 need
# nothing of the server)
STAGE_NOT_READY = "准备"
STAGE_RAPID = "快速发散"
STAGE_DEEP = "深入发散"
STAGE_CONVERGENCE = "收敛"
# designSchemes key -> user-document field
SCHEME_FIELDS = {
    STAGE_RAPID: "rapidDivergenceSchemes",
    STAGE_DEEP: "deepDivergenceSchemes",
    STAGE_CONVERGENCE: "convergenceSchemes",
}

# /generate `type`
TYPE_RAPID = 0
TYPE_DEEP = 1
TYPE_CONVERGENCE_NAMES = 2
TYPE_CONVERGENCE = 3
TYPE_STAGES = {
    TYPE_RAPID: "rapid",
    TYPE_DEEP: "deep",
    TYPE_CONVERGENCE_NAMES: "convergence_names",
    TYPE_CONVERGENCE: "convergence",
}

# Creative.type (apps/paint/creatives.py of the original, the frontend's CreativeType; its 1 rapid concrete
# and 3 convergence group one exist there, but no pipeline of the original or ours makes them)
CREATIVE_RAPID_ABSTRACT = 0
CREATIVE_DEEP = 2
CREATIVE_CONVERGENCE_GROUP_TWO = 4
DISPLAY_SEQUENCE = "sequence"
DISPLAY_DIRECT = "direct"

# item types (the frontend's groupTypeOne goes with creative type 3, which nothing makes)
ABSTRACT_TEXT = "abstractText"
CONCRETE_TEXT = "concreteText"
ABSTRACT_IMAGE = "abstractImage"
CONCRETE_IMAGE = "concreteImage"
GROUP_TWO = "groupTypeTwo"
