"""Chat messages: the shape check, attaching images (OpenAI vision form) and dropping them for text-only models.

One copy for the front door (agent.llm.client drops images for providers without vision) and the local
provider (its chat template takes plain text only).
"""

from __future__ import annotations

import base64
from typing import Any

from agent.types import Message

NO_VISION_NOTE = "image parts dropped: {provider} has no vision"
IMAGE_PART_TYPES = ("image_url", "input_image", "image")


def check_messages(messages: Any) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("chat() needs messages (a non-empty list) or a template")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or "content" not in msg:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
    return messages


def _sniff(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    raise ValueError("images=: bytes are not PNG, JPEG, WebP or GIF")


def image_url(image: str | bytes) -> str:
    """A data URL or http(s) URL for one image (bytes are encoded as a data URL)."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        return f"data:{_sniff(data)};base64,{base64.b64encode(data).decode('ascii')}"
    if isinstance(image, str) and (
        image.startswith("data:image/") or image.startswith(("http://", "https://"))
    ):
        return image
    raise ValueError("images= takes data URLs (data:image/...;base64,...), http(s) URLs or image bytes")


def attach_images(messages: list[Message], images: list[str | bytes]) -> list[Message]:
    """Add image parts (OpenAI vision form) before the text of the last user message."""
    if not images:
        return messages
    urls = [image_url(i) for i in images]
    out = [dict(m) for m in messages]
    for msg in reversed(out):
        if msg.get("role") == "user":
            content = msg.get("content")
            parts = list(content) if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            msg["content"] = [*({"type": "image_url", "image_url": {"url": url}} for url in urls), *parts]
            return out
    raise ValueError("images= needs a user message to attach the images to")


def text_of(content: list[Any]) -> tuple[str, int]:
    """A list content's text parts joined by newlines, and how many image parts it held."""
    texts: list[str] = []
    dropped = 0
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
            dropped += 1
        elif isinstance(part, dict) and (part.get("type") == "text" or isinstance(part.get("text"), str)):
            texts.append(str(part.get("text") or ""))
    return "\n".join(t for t in texts if t), dropped


def drop_images(messages: list[Message]) -> tuple[list[Message], int]:
    """Text-only copy of the messages (for providers without vision) and how many images were dropped."""
    dropped = 0
    out: list[Message] = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(msg)
            continue
        text, count = text_of(content)
        dropped += count
        out.append({**msg, "content": text})
    return (out, dropped) if dropped else (messages, 0)


def to_text_messages(messages: list[Message]) -> tuple[list[dict[str, str]], int]:
    """OpenAI-style messages -> plain-text messages for a chat template; returns (messages, images dropped).

    List contents become their joined text parts; roles other than system/user/assistant become user
    (`developer` becomes system).
    """
    out: list[dict[str, str]] = []
    dropped = 0
    for msg in messages:
        role = msg.get("role") or "user"
        role = {"developer": "system"}.get(role, role)
        if role not in ("system", "user", "assistant"):
            role = "user"
        content = msg.get("content")
        if isinstance(content, list):
            text, count = text_of(content)
            dropped += count
        else:
            text = "" if content is None else str(content)
        out.append({"role": role, "content": text})
    return out, dropped
