"""One typed settings object, read from the environment and `.env`.

Every key is documented in `.env.example`. Parsing is strict: a boolean that is not
one of true/false/yes/no/1/0 is an error at start-up, not a silent False.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv import load_dotenv
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent

# APP IDs of the original contracts (InsPilot's `appid`).
APP_PAINT = 0

APP_NAMES = ("storybook", "ideation", "refinement", "storyteller")


def _split_csv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


class Settings(BaseSettings):
    """Server configuration. Field names are the environment variable names."""

    model_config = SettingsConfigDict(
        env_file=None, case_sensitive=True, extra="ignore", validate_default=True
    )

    # --- database
    MONGO_URI: str | None = None
    MONGO_DB: str = "creativity"
    DATA_DIR: Path = PROJECT_ROOT / "data"
    EMBEDDED_MONGO_PORT: int = 0  # 0 = pick a free port (recorded in DATA_DIR for other workers)

    # --- language models
    LLM_PROVIDER: Literal["azure", "openai", "local"] | None = None
    LLM_MODEL: str = "gpt-4o-mini"
    VISION_MODEL: str | None = None
    OPENAI_BASE_URL: str | None = None
    OPENAI_API_KEY: str | None = None
    AZURE_OPENAI_ENDPOINT: str | None = None
    AZURE_OPENAI_API_KEY: str | None = None
    AZURE_OPENAI_API_VERSION: str = "2024-10-21"
    AZURE_OPENAI_DEPLOYMENT: str | None = None
    LLM_TIMEOUT_S: float = 120.0
    LLM_MAX_RETRIES: int = 3
    LLM_RETRY_BASE_S: float = 0.5
    LLM_MAX_CONCURRENCY: int = 8  # per process
    LLM_GLOBAL_CONCURRENCY: int = 32  # all workers and hosts (leases in MongoDB)
    MODERATION: Literal["auto", "openai", "local", "off"] = "auto"
    LOCAL_MODEL: Literal["smollm2-135m", "gemma3-270m"] = "smollm2-135m"  # packaged model; bench/quality.py
    LOCAL_MODEL_PATH: str | None = None
    LOCAL_N_CTX: int = 2048
    LOCAL_THREADS: int | None = None
    LOCAL_TEMPERATURE: float = 0.7
    LOCAL_MAX_TOKENS: int = 512
    LOCAL_LLM_MODE: Literal["auto", "inprocess", "server"] = "auto"

    # --- images
    IMAGE_PROVIDER: Literal["sdwebui", "openai", "placeholder"] | None = None
    SD_INSTANCES: Annotated[list[str], NoDecode] = Field(default_factory=list)
    SD_TIMEOUT_S: float = 180.0
    SD_WAIT_TIMEOUT_S: float = 300.0  # longest a caller waits for a free instance
    SD_LEASE_S: float = 60.0  # lease length; renewed while a generation runs
    SD_MAX_ATTEMPTS: int = 3
    SD_SAM_ENABLED: bool = False
    OPENAI_IMAGE_MODEL: str = "gpt-image-1"
    MAX_IMAGE_BYTES: int = 10 * 1024 * 1024
    MAX_IMAGE_SIDE: int = 4096
    IMAGE_CACHE_MB: int = Field(64, ge=0)  # recently served images kept per process (0: off); they never change

    # --- apps
    STORYBOOK_MAX_PAGES: int = 20
    IDEATION_MAX_NUM: int = 8
    IDEATION_CHECKPOINT_SKETCH: str = "realisticVisionV60B1_v60B1VAE"
    IDEATION_CHECKPOINT_MODEL: str = "v2-1_512-ema-pruned"
    IDEATION_CHECKPOINT_CONTROL: str = "v1-5-pruned-emaonly"
    IDEATION_MULTIVIEW_CMD: str | None = None  # argv (shell-free) of a multi-view tool; {input} {output} placeholders
    IDEATION_MULTIVIEW_TIMEOUT_S: float = 600.0
    REFINEMENT_LANGUAGE: Literal["zh", "en"] = "zh"
    STORYTELLER_MODEL: str | None = None  # e.g. the fine-tuned Ollama model name; None = provider default
    STORYTELLER_MAX_WORDS: int = 5000

    # --- server
    ROOT_APP: Literal["storybook", "ideation", "refinement", "storyteller"] | None = None
    CORS_ORIGINS: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    MAX_CONTENT_LENGTH: int = 20 * 1024 * 1024
    AUTH_MODE: Literal["none", "basic", "apikey"] = "none"
    # with auth on: "owner" = an image needs its owner's (or an admin's) credentials; "link" = its
    # unguessable URL is enough (a share link), for frontends that show images with <img src>
    IMAGE_ACCESS: Literal["owner", "link"] = "owner"
    BASIC_AUTH_USERNAME: str | None = None
    BASIC_AUTH_PASSWORD: str | None = None
    SECRET_KEY: str | None = None
    JOB_WORKERS: int = 4  # threads per process that run long jobs
    JOB_LEASE_S: float = 30.0
    SSE_HEARTBEAT_S: float = 15.0
    SSE_POLL_S: float = 0.2
    PROMPTS_DIR: Path = PROJECT_ROOT / "settings"
    LOG_LEVEL: str = "INFO"
    LOG_JSON: bool = False
    HOST: str = "127.0.0.1"
    PORT: int = 5000
    PUBLIC_BASE_URL: str | None = None  # absolute base for image URLs; default: the request's host

    # --- limits (apps/core/ratelimit.py, apps/core/spend.py) and stream tokens (apps/core/auth.py)
    RATE_LIMIT_ENABLED: bool = True
    RATE_LIMIT_DEFAULT: str = "600/minute"  # every request of one user (auth on) or client IP, all routes
    RATE_LIMIT_GENERATE: str = "60/minute"  # requests that start model work (POST /storybook/..., .../generate)
    RATE_LIMIT_STRATEGY: Literal["fixed-window", "moving-window"] = "fixed-window"
    RATE_LIMIT_BATCH_S: float = Field(0.2, ge=0)  # fixed-window counts added to MongoDB this often (0: every request)
    RATE_LIMIT_STORAGE_URI: str | None = None  # default: the MongoDB in use (shared by workers and hosts)
    MODEL_DAILY_CALL_CAP: int = 1000  # model calls per user per UTC day (auth on, admins exempt); 0 = off
    STREAM_TOKEN_TTL_S: int = 3600  # life of a `?token=` for EventSource URLs
    PROXY_FIX_X_FOR: int = 0  # proxies in front whose X-Forwarded-For is trusted for the client IP

    @field_validator("SD_INSTANCES", "CORS_ORIGINS", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> list[str]:
        return _split_csv(value)

    @field_validator("SD_INSTANCES")
    @classmethod
    def _strip_slash(cls, value: list[str]) -> list[str]:
        return [v.rstrip("/") for v in value]

    @field_validator("LLM_PROVIDER", "IMAGE_PROVIDER", "ROOT_APP", "MONGO_URI", "RATE_LIMIT_STORAGE_URI",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _derive_providers(self) -> Settings:
        if self.LLM_PROVIDER is None:
            if self.AZURE_OPENAI_ENDPOINT and self.AZURE_OPENAI_DEPLOYMENT:
                self.LLM_PROVIDER = "azure"
            elif self.OPENAI_BASE_URL or self.OPENAI_API_KEY:
                self.LLM_PROVIDER = "openai"
            else:
                self.LLM_PROVIDER = "local"
        if self.IMAGE_PROVIDER is None:
            self.IMAGE_PROVIDER = "sdwebui" if self.SD_INSTANCES else "placeholder"
        if self.IMAGE_PROVIDER == "sdwebui" and not self.SD_INSTANCES:
            raise ValueError("IMAGE_PROVIDER=sdwebui needs SD_INSTANCES (comma-separated WebUI base URLs)")
        if self.AUTH_MODE == "basic" and not (self.BASIC_AUTH_USERNAME and self.BASIC_AUTH_PASSWORD):
            # no pair configured: basic auth still works for users created with `flask users create`
            pass
        return self


def load_settings(overrides: dict[str, Any] | None = None, *, use_env: bool = True) -> Settings:
    """Build Settings from `.env` + environment, then apply explicit overrides (tests)."""
    if use_env:
        load_dotenv(PROJECT_ROOT / ".env", override=False)
        return Settings(**(overrides or {}))
    return Settings.model_validate(overrides or {})


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
