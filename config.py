"""One typed settings object, read from the environment and `.env`.

Every key is documented in `.env.example`. Parsing is strict: a boolean that is not
one of true/false/yes/no/1/0 is an error at start-up, not a silent False, and a URL
setting that is not a URL stops the start instead of failing the first request minutes
later. Entry points wrap start-up in `exit_on_config_error()`, so an operator sees one
line per bad key (`config error: KEY: why`) and no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from dotenv import load_dotenv
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

PROJECT_ROOT = Path(__file__).resolve().parent

# APP IDs of the original contracts (InsPilot's `appid`).
APP_PAINT = 0

APP_NAMES = ("storybook", "ideation", "refinement", "storyteller")


# exit status of a start stopped by bad settings: gunicorn's WORKER_BOOT_ERROR, so a master whose
# worker finds a bad setting halts instead of respawning it forever (any non-zero code would do elsewhere)
CONFIG_ERROR_EXIT = 3

# settings whose values never appear in an error line
_SECRET_MARKERS = ("KEY", "PASSWORD", "SECRET", "TOKEN")


def check_http_url(value: str, example: str) -> str:
    """`value` if it is an http(s) URL with a host (and a numeric port, if any); else ValueError saying why."""
    if any(c.isspace() for c in value):
        raise ValueError(f"{value!r} contains whitespace; expected an http(s) URL such as {example}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid URL ({exc}); expected e.g. {example}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{value!r} is not an http(s) URL; expected e.g. {example}")
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host; expected e.g. {example}")
    return value


def check_mongo_uri(value: str) -> str:
    """`value` if pymongo can parse it as a connection string, without any network lookup."""
    from pymongo.errors import ConfigurationError
    from pymongo.uri_parser import parse_uri

    try:
        if value.startswith("mongodb+srv://"):
            # parse_uri resolves SRV records (DNS) after parsing; settings must load offline and fast,
            # so run only the syntax checks that parse_uri runs first
            from pymongo.uri_parser_shared import _validate_uri

            _validate_uri(value, default_port=None)
        else:
            parse_uri(value)
    except (
        ConfigurationError,
        ValueError,
    ) as exc:  # InvalidURI is a ConfigurationError; bad ports: ValueError
        # the message, never the URI: it may hold a password
        raise ValueError(f"not a MongoDB connection string: {exc} (e.g. mongodb://127.0.0.1:27017)") from None
    return value


class ConfigError(ValueError):
    """Settings that cannot start the server: one `(key, why)` per problem, printable as one line each."""

    def __init__(self, problems: list[tuple[str | None, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(self.lines()))

    def lines(self) -> list[str]:
        return [
            f"config error: {key}: {why}" if key else f"config error: {why}" for key, why in self.problems
        ]

    @classmethod
    def from_validation(cls, exc: ValidationError) -> ConfigError:
        problems: list[tuple[str | None, str]] = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err.get("loc", ())) or None
            why = str(err.get("msg", "invalid"))
            for prefix in ("Value error, ", "Assertion failed, "):
                why = why.removeprefix(prefix)
            secret = key is not None and any(m in key.upper() for m in _SECRET_MARKERS)
            if key and not secret and err.get("type") != "value_error" and "input" in err:
                why = f"{why} (got {err['input']!r})"
            problems.append((key, why))
        return cls(problems)


@contextmanager
def exit_on_config_error(code: int = CONFIG_ERROR_EXIT) -> Iterator[None]:
    """Turn a ConfigError inside the block into its lines on stderr and SystemExit(code), no traceback."""
    try:
        yield
    except ConfigError as exc:
        sys.stderr.write("".join(line + "\n" for line in exc.lines()))
        sys.stderr.flush()
        raise SystemExit(code) from None


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
    # lease seats per SD instance: 2 = one running + one queued inside the WebUI, so no hand-over sits
    # between two images; 1 = strictly one at a time (docs/pool.md)
    SD_QUEUE_DEPTH: int = Field(2, ge=1, le=2)
    # the call queued behind a running image is sent when that image has this many seconds left (the
    # WebUI's /progress estimate), so until then it can move to an instance that went idle; 0: at once
    SD_SEND_AHEAD_S: float = Field(0.3, ge=0, le=60)
    SD_SAM_ENABLED: bool = False
    OPENAI_IMAGE_MODEL: str = "gpt-image-1"
    MAX_IMAGE_BYTES: int = 10 * 1024 * 1024
    MAX_IMAGE_SIDE: int = 4096
    # recently served images kept per process (0: off); they never change
    IMAGE_CACHE_MB: int = Field(64, ge=0)

    # --- apps
    STORYBOOK_MAX_PAGES: int = 20
    IDEATION_MAX_NUM: int = 8
    IDEATION_CHECKPOINT_SKETCH: str = "realisticVisionV60B1_v60B1VAE"
    IDEATION_CHECKPOINT_MODEL: str = "v2-1_512-ema-pruned"
    IDEATION_CHECKPOINT_CONTROL: str = "v1-5-pruned-emaonly"
    # argv (shell-free) of a multi-view tool; {input} {output} placeholders
    IDEATION_MULTIVIEW_CMD: str | None = None
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
    HEALTH_CACHE_S: float = Field(5.0, ge=0)  # /health's probes are reused this long (per process)
    HEALTH_TIMEOUT_S: float = Field(4.0, gt=0)  # /health answers within about this, however slow a probe

    # --- limits (apps/core/ratelimit.py, apps/core/spend.py) and stream tokens (apps/core/auth.py)
    RATE_LIMIT_ENABLED: bool = True
    RATE_LIMIT_DEFAULT: str = "600/minute"  # every request of one user (auth on) or client IP, all routes
    # requests that start model work (POST /storybook/..., .../generate)
    RATE_LIMIT_GENERATE: str = "60/minute"
    RATE_LIMIT_STRATEGY: Literal["fixed-window", "moving-window"] = "fixed-window"
    # fixed-window counts added to MongoDB this often (0: every request)
    RATE_LIMIT_BATCH_S: float = Field(0.2, ge=0)
    RATE_LIMIT_STORAGE_URI: str | None = None  # default: the MongoDB in use (shared by workers and hosts)
    MODEL_DAILY_CALL_CAP: int = 1000  # model calls per user per UTC day (auth on, admins exempt); 0 = off
    STREAM_TOKEN_TTL_S: int = 3600  # life of a `?token=` for EventSource URLs
    PROXY_FIX_X_FOR: int = 0  # proxies in front whose X-Forwarded-For is trusted for the client IP

    # --- studies (agent/studies.py, apps/core/studies.py) and cost (agent/prices.py)
    STUDY: str | None = (
        None  # settings/studies/<STUDY>.yaml: conditions (prompt variants + params) per participant
    )
    MODEL_PRICES: str | None = None  # JSON or a file path: {"model": {"input": USD/1M tokens, "output": ...}}

    @field_validator("SD_INSTANCES", "CORS_ORIGINS", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> list[str]:
        return _split_csv(value)

    @field_validator("SD_INSTANCES")
    @classmethod
    def _sd_urls(cls, value: list[str]) -> list[str]:
        for i, url in enumerate(value, 1):
            try:
                check_http_url(url, "http://127.0.0.1:7860")
            except ValueError as exc:
                where = f"instance {i} of {len(value)}: " if len(value) > 1 else ""
                raise ValueError(f"{where}{exc} (comma-separated SD WebUI base URLs)") from None
        return [v.rstrip("/") for v in value]

    @field_validator("OPENAI_BASE_URL")
    @classmethod
    def _openai_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value, "https://api.openai.com/v1")

    @field_validator("AZURE_OPENAI_ENDPOINT")
    @classmethod
    def _azure_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value, "https://<resource>.openai.azure.com")

    @field_validator("PUBLIC_BASE_URL")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value, "https://stories.example.org")

    @field_validator("MONGO_URI")
    @classmethod
    def _mongo_uri(cls, value: str | None) -> str | None:
        return None if value is None else check_mongo_uri(value)

    @field_validator(
        "LLM_PROVIDER",
        "IMAGE_PROVIDER",
        "ROOT_APP",
        "MONGO_URI",
        "RATE_LIMIT_STORAGE_URI",
        "OPENAI_BASE_URL",
        "AZURE_OPENAI_ENDPOINT",
        "PUBLIC_BASE_URL",
        mode="before",
    )
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
            # no field to attach this to: the key leads the message (ConfigError prints it as is)
            raise ValueError("IMAGE_PROVIDER: sdwebui needs SD_INSTANCES (comma-separated WebUI base URLs)")
        if self.AUTH_MODE == "basic" and not (self.BASIC_AUTH_USERNAME and self.BASIC_AUTH_PASSWORD):
            # no pair configured: basic auth still works for users created with `flask users create`
            pass
        return self


def load_settings(overrides: dict[str, Any] | None = None, *, use_env: bool = True) -> Settings:
    """Build Settings from `.env` + environment, then apply explicit overrides (tests).

    Raises ConfigError (a ValueError) naming every bad key.
    """
    try:
        if use_env:
            load_dotenv(PROJECT_ROOT / ".env", override=False)
            return Settings(**(overrides or {}))
        return Settings.model_validate(overrides or {})
    except ValidationError as exc:
        raise ConfigError.from_validation(exc) from exc
    except SettingsError as exc:  # a source that could not be read or decoded at all
        raise ConfigError([(None, str(exc))]) from exc
