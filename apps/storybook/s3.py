"""Optional: the storybook's pictures also in an S3 bucket, handed out as expiring URLs (as the original).

Off unless `STORYBOOK_S3_BUCKET` is set. GridFS stays the master copy (records, export,
`/images/<id>.png`); S3 is how the pictures reach readers without going through this server.

Environment (read here, like STORYBOOK_MAX_PAGES; a Settings field of the same name wins if one exists):
- `STORYBOOK_S3_BUCKET`: the bucket (must exist).
- `STORYBOOK_S3_ENDPOINT_URL`: an S3-compatible endpoint (MinIO, moto, R2...); unset = AWS.
- `STORYBOOK_S3_REGION`: default `us-east-1`.
- `STORYBOOK_S3_PREFIX`: key prefix, default `storybook/`; keys are `<prefix><book id>/<page-3|cover>.png`.
- `STORYBOOK_S3_URL_EXPIRES_S`: lifetime of the presigned GET URLs, default 86400 (SigV4 allows 7 days).
  URLs are signed again whenever a book is read, so a stored book never hands out a dead link.
- `STORYBOOK_S3_PUBLIC_BASE_URL`: a public bucket/CDN base; URLs are then `<base>/<key>`, unsigned.
Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, a role).
Deleting old objects is the bucket's lifecycle rule, as in the original deployment. Needs `pip install .[s3]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from agent.types import ModelError

EXTRA_KEY = "storybook_s3"


@dataclass(frozen=True)
class S3Config:
    bucket: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    prefix: str = "storybook/"
    expires_s: int = 86400
    public_base_url: str | None = None


def _value(settings: Any, name: str) -> str | None:
    value = getattr(settings, name, None) if settings is not None else None
    if value is None:
        value = os.environ.get(name)
    return str(value).strip() if value is not None and str(value).strip() else None


def s3_config(settings: Any = None) -> S3Config | None:
    bucket = _value(settings, "STORYBOOK_S3_BUCKET")
    if not bucket:
        return None
    expires = _value(settings, "STORYBOOK_S3_URL_EXPIRES_S") or "86400"
    try:
        expires_s = int(expires)
    except ValueError as exc:
        raise ValueError(
            f"STORYBOOK_S3_URL_EXPIRES_S must be a whole number of seconds, not {expires!r}"
        ) from exc
    if not 1 <= expires_s <= 7 * 86400:
        raise ValueError("STORYBOOK_S3_URL_EXPIRES_S must be between 1 and 604800 (7 days, the SigV4 limit)")
    return S3Config(
        bucket=bucket,
        endpoint_url=_value(settings, "STORYBOOK_S3_ENDPOINT_URL"),
        region=_value(settings, "STORYBOOK_S3_REGION") or "us-east-1",
        prefix=_value(settings, "STORYBOOK_S3_PREFIX") or "storybook/",
        expires_s=expires_s,
        public_base_url=_value(settings, "STORYBOOK_S3_PUBLIC_BASE_URL"),
    )


class S3Images:
    """Upload PNGs and make their URLs."""

    def __init__(self, config: S3Config) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise RuntimeError(
                "STORYBOOK_S3_BUCKET is set but boto3 is missing: pip install '.[s3]'"
            ) from exc
        self.config = config
        self.client = boto3.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            config=Config(
                signature_version="s3v4",
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def key(self, book_id: str, name: str) -> str:
        return f"{self.config.prefix}{book_id}/{name}.png"

    def put(self, key: str, png: bytes) -> None:
        """Raises ModelError(kind="image"): a picture that is not stored must not be linked."""
        try:
            self.client.put_object(
                Bucket=self.config.bucket,
                Key=key,
                Body=png,
                ContentType="image/png",
                CacheControl="private, max-age=86400",
            )
        except Exception as exc:  # noqa: BLE001 - botocore raises many types; all mean "not stored"
            raise ModelError(
                f"could not store the picture in S3 bucket {self.config.bucket!r}: {exc}",
                provider="s3",
                kind="image",
            ) from exc

    def url(self, key: str) -> str:
        if self.config.public_base_url:
            return f"{self.config.public_base_url.rstrip('/')}/{key}"
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.config.bucket, "Key": key}, ExpiresIn=self.config.expires_s
        )


def s3_images(svc: Any) -> S3Images | None:
    """The app's S3 helper (built once per app), or None when S3 is not configured."""
    if EXTRA_KEY not in svc.extras:
        config = s3_config(svc.settings)
        svc.extras[EXTRA_KEY] = S3Images(config) if config else None
    return svc.extras[EXTRA_KEY]
