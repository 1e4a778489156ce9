"""The chat front door: `LLM` (chat / stream / JSON / moderate) and what apps pass to it or catch from it.

Builders from Settings live in agent.llm.build; providers in agent.llm.providers.
"""

from agent.call_context import CallContext
from agent.llm.client import LLM
from agent.llm.json_reply import parse_json_text, schema_problem
from agent.llm.slots import GlobalSlots, SlotTimeout
from agent.llm.streaming import ChatStream

__all__ = [
    "LLM",
    "CallContext",
    "ChatStream",
    "GlobalSlots",
    "SlotTimeout",
    "parse_json_text",
    "schema_problem",
]
