"""S3 backend (AWS S3, MinIO, any S3-compatible server) on boto3.

Every botocore failure is translated here, in one place, into the package's errors: an endpoint
that refuses, times out or drops the connection, missing credentials, access denied or a missing
bucket all become :class:`StoreUnavailableError` with a message naming the endpoint and what to
check; a missing key becomes :class:`ObjectMissing`. Retries with exponential backoff and jitter
are botocore's "standard" mode, bounded by ``max_attempts``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
)

from openlora_ray.errors import StoreUnavailableError
from openlora_ray.store.backends import ObjectExists, ObjectInfo, ObjectMissing, Progress, copy_hashing
from openlora_ray.store.settings import StoreSettings
from openlora_ray.store.uri import S3Root

log = logging.getLogger(__name__)

_MISSING = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
_MULTIPART_THRESHOLD = 64 << 20


def make_client(settings: StoreSettings):
    """A thread-safe S3 client: AWS config chain, overridden by whatever ``settings`` sets."""
    try:
        session = boto3.session.Session(profile_name=settings.profile, region_name=settings.region)
    except ProfileNotFound as e:
        raise StoreUnavailableError(f"{e}; check AWS_PROFILE / the store's profile setting and ~/.aws/config") from e
    config = Config(
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        s3={"addressing_style": settings.addressing_style},
        max_pool_connections=32,
    )
    secret = settings.secret_access_key.get_secret_value() if settings.secret_access_key else None
    token = settings.session_token.get_secret_value() if settings.session_token else None
    return session.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=secret,
        aws_session_token=token,
        config=config,
    )


class S3ObjectStore:
    """Objects under ``s3://bucket/prefix``; keys given to it are relative to the prefix."""

    def __init__(self, root: S3Root, settings: StoreSettings, client=None) -> None:
        self.root = root
        self.settings = settings
        self.client = client if client is not None else make_client(settings)
        self.endpoint = self.client.meta.endpoint_url
        self._transfer = TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD, max_concurrency=8)

    def describe(self) -> str:
        return f"{self.root} at {self.endpoint}"

    @contextmanager
    def _errors(self, key: str, action: str):
        """Translate botocore errors raised inside the block (see module docstring)."""
        where = self.describe()
        try:
            yield
        except ClientError as e:
            raise self._client_error(e, key, action) from e
        except S3UploadFailedError as e:
            cause = e.__context__
            if isinstance(cause, ClientError):
                raise self._client_error(cause, key, action) from e
            raise StoreUnavailableError(f"{action} {key!r} failed on {where}: {e}") from e
        except ReadTimeoutError as e:
            raise StoreUnavailableError(
                f"{where} did not answer within {self.settings.read_timeout_s:g}s "
                f"({self.settings.max_attempts} attempts) while trying to {action} {key!r}; "
                "check that the server is healthy and not overloaded, or raise read_timeout_s"
            ) from e
        except IncompleteReadError as e:
            raise StoreUnavailableError(
                f"{where} closed the connection in the middle of {key!r} ({e}); check the server's health"
            ) from e
        except (HTTPClientError, BotoConnectionError) as e:  # refused, reset, connect timeout, TLS
            raise StoreUnavailableError(
                f"cannot reach {where} to {action} {key!r}: {e}; check the endpoint URL, that the "
                "server is running and reachable from this host"
            ) from e
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise StoreUnavailableError(
                f"no usable AWS credentials for {where}: {e}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or the store settings' access keys"
            ) from e

    def _client_error(self, e: ClientError, key: str, action: str) -> Exception:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _MISSING or (status == 404 and code != "NoSuchBucket"):
            return ObjectMissing(key)
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return ObjectExists(key)
        if code == "NoSuchBucket":
            return StoreUnavailableError(
                f"bucket {self.root.bucket!r} does not exist at {self.endpoint}; create it or fix the store URI"
            )
        if code in _DENIED:
            return StoreUnavailableError(
                f"access denied by {self.describe()} ({code}) trying to {action} {key!r}; "
                "check the credentials and the bucket policy"
            )
        return StoreUnavailableError(
            f"{self.describe()} failed to {action} {key!r}: {code} {err.get('Message', '')}".rstrip()
        )

    def list(self, prefix: str, start_after: str = "") -> Iterator[ObjectInfo]:
        # ``prefix`` is "" or ends with "/", so "a/" never matches "ab/...".
        base = self.root.prefix + "/" if self.root.prefix else ""
        strip = len(base)
        extra = {"StartAfter": base + start_after} if start_after else {}
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors(prefix, "list"):
            for page in paginator.paginate(Bucket=self.root.bucket, Prefix=base + prefix, **extra):
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(obj["Key"][strip:], obj["Size"], obj["LastModified"])

    def read_bytes(self, key: str) -> bytes:
        with self._errors(key, "read"):
            return self.client.get_object(Bucket=self.root.bucket, Key=self.root.key(key))["Body"].read()

    def download(self, key: str, dest: Path, progress: Progress | None = None) -> str:
        # One streaming GET, hashed while written: cheaper than s3transfer's HEAD + GET for the
        # tens-of-MB objects adapters are, and the sha256 comes for free.
        with self._errors(key, "download"):
            body = self.client.get_object(Bucket=self.root.bucket, Key=self.root.key(key))["Body"]
            with body, open(dest, "wb") as f:
                return copy_hashing(body, f, progress)

    def upload(self, src: Path, key: str, progress: Progress | None = None) -> None:
        with self._errors(key, "upload"):
            self.client.upload_file(
                str(src), self.root.bucket, self.root.key(key), Config=self._transfer, Callback=progress
            )

    def write_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        with self._errors(key, "write"):
            self.client.put_object(Bucket=self.root.bucket, Key=self.root.key(key), Body=data, **extra)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.root.key(k)} for k in keys[start : start + 1000]]
            with self._errors(keys[start], "delete"):
                resp = self.client.delete_objects(Bucket=self.root.bucket, Delete={"Objects": batch, "Quiet": True})
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StoreUnavailableError(
                    f"{self.describe()} refused to delete {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )
