"""Objects in S3-compatible storage, as rela reads and writes them: `s3://bucket/key` URLs.

Through boto3, for what it already does well: the standard credential chain (environment,
`~/.aws`, instance roles), `AWS_ENDPOINT_URL` for S3-compatible stores (MinIO, SeaweedFS, R2, ...),
byte-range GETs and thread-safe clients. rela adds what a training run needs on top:

- one client per process (worker processes are forked: a client's connection pool must not be
  shared across a fork), shared by that process's threads;
- bounded waits: connect and read timeouts, and retries with exponential backoff on what a
  restarting or overloaded server answers (connection errors, timeouts, 5xx, SlowDown) until
  `RELA_S3_RETRY_SECONDS` (default 120) have passed — an epoch survives a server restart;
- errors that name the object and say what to do (a wrong credential, a missing bucket or
  object), raised as `ObjectStoreError` (one line in the CLI), never a botocore traceback;
- reads pinned to an ETag (`If-Match`): an object replaced since rela indexed it fails loudly
  instead of returning another file's bytes at the old offsets.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass

from rela.errors import DatasetError

SCHEME = "s3://"
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10, 60
_RETRY_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
                "RequestTimeTooSkewed"}


class ObjectStoreError(DatasetError):
    """An object could not be read or written (named in the message, with what to do)."""


class ObjectNotFound(ObjectStoreError):
    """The object is not there."""


class BucketNotFound(ObjectStoreError):
    """The bucket is not there."""


def is_remote(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(SCHEME)


@dataclass(frozen=True)
class ObjectURL:
    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> ObjectURL:
        if not is_remote(url):
            raise ObjectStoreError(f"{url!r} is not an s3://bucket/key URL")
        bucket, _, key = url[len(SCHEME):].partition("/")
        if not bucket:
            raise ObjectStoreError(f"{url!r} names no bucket (s3://bucket/key)")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    def sibling(self, name: str) -> ObjectURL:
        return ObjectURL(self.bucket, self.key.rpartition("/")[0] + "/" + name if "/" in self.key else name)


class PerProcess:
    """One object per process, made on first use: a forked worker gets its own, never the parent's
    (a client's sockets, a thread pool's threads, do not survive a fork). Shared by that process's
    threads."""

    def __init__(self, make) -> None:
        self._make, self._lock, self._made = make, threading.Lock(), {}

    def get(self):
        pid = os.getpid()
        with self._lock:
            if pid not in self._made:
                self._made.clear()  # a forked child: the parent's object is not ours
                self._made[pid] = self._make()
            return self._made[pid]

    def reset(self) -> None:
        """Make it afresh at the next `get` (after the environment it reads has changed)."""
        with self._lock:
            self._made.clear()


_client = PerProcess(lambda: _make_client())


def client():
    """This process's S3 client, from boto3's standard chain and `AWS_ENDPOINT_URL`."""
    return _client.get()


def reset_client() -> None:
    """A new client at the next request: for credentials or an endpoint set after the first one."""
    _client.reset()


def _make_client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ObjectStoreError("reading s3:// data needs boto3: pip install boto3 (or rela-accel[s3])") from None
    config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S, retries={"max_attempts": 1},
                    max_pool_connections=64)
    s3 = boto3.session.Session().client("s3", config=config)
    delay = float(os.environ.get("RELA_S3_DELAY_MS", 0) or 0) / 1000
    if delay > 0:  # bench/remote.py's injected latency: each request waits as on a real network
        s3.meta.events.register("before-send.s3", lambda **_: time.sleep(delay))
    return s3


def _call(url: ObjectURL, what: str, fn):
    """fn() with retries on what a restarting or busy server answers, until the retry budget is
    spent; other failures as one ObjectStoreError naming the object."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    budget = float(os.environ.get("RELA_S3_RETRY_SECONDS", 120))
    start, attempt = time.monotonic(), 0
    while True:
        try:
            return fn()
        except NoCredentialsError:
            raise ObjectStoreError(f"{url}: no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (and AWS_ENDPOINT_URL for a "
                                   "store other than AWS)") from None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code not in _RETRY_CODES and not (isinstance(status, int) and status >= 500):
                raise _explain(url, what, code, status) from None
            failure = f"{code or status}"
        except BotoCoreError as e:  # connection refused or reset, timeouts, a closed connection
            failure = type(e).__name__
        waited = time.monotonic() - start
        if waited >= budget:
            raise ObjectStoreError(f"{url}: {what} still failing after {waited:.0f} s of retries ({failure}); is "
                                   f"the endpoint {endpoint()} up? (RELA_S3_RETRY_SECONDS sets how long rela "
                                   "retries)") from None
        time.sleep(min(5.0, 0.1 * 2 ** attempt) * (0.5 + random.random() / 2))
        attempt += 1


def _explain(url: ObjectURL, what: str, code: str, status: int) -> ObjectStoreError:
    if code == "NoSuchBucket":
        return BucketNotFound(f"{url}: bucket {url.bucket!r} does not exist at {endpoint()}")
    if code in ("NoSuchKey", "NotFound", "404") or status == 404:
        return ObjectNotFound(f"{url}: no such object ({what}); was it deleted or renamed? Check the path, or "
                              "write the shards again")
    if code in ("AccessDenied", "403", "SignatureDoesNotMatch", "InvalidAccessKeyId") or status == 403:
        return ObjectStoreError(f"{url}: access denied ({code or status}) on {what}: check the credentials "
                                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and that they may use "
                                "this bucket")
    if code == "PreconditionFailed" or status == 412:
        return ObjectStoreError(f"{url} changed since rela indexed it: its members may no longer be where the "
                                "index says. Open the dataset again (rela re-indexes a changed shard); a run whose "
                                "data changes under it cannot resume exactly")
    if code == "InvalidBucketName":
        return ObjectStoreError(f"{url}: {url.bucket!r} is not a valid bucket name")
    return ObjectStoreError(f"{url}: {what} failed ({code or status})")


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


@dataclass(frozen=True)
class Head:
    size: int
    etag: str


def head(url: ObjectURL) -> Head:
    """The object's size and ETag. A HEAD's 404 does not say whether the bucket is missing: asked."""
    try:
        r = _call(url, "HEAD", lambda: client().head_object(Bucket=url.bucket, Key=url.key))
    except ObjectNotFound:
        try:
            _call(url, "HEAD bucket", lambda: client().head_bucket(Bucket=url.bucket))
        except ObjectNotFound:
            raise BucketNotFound(f"{url}: bucket {url.bucket!r} does not exist at {endpoint()}") from None
        raise
    return Head(int(r["ContentLength"]), r["ETag"])


def read(url: ObjectURL, offset: int = 0, size: int | None = None, etag: str | None = None) -> bytes:
    """The object's bytes [offset, offset + size) (all of it from offset when size is None), from
    the version `etag` names when given."""
    kw = {"Bucket": url.bucket, "Key": url.key}
    if offset or size is not None:
        kw["Range"] = f"bytes={offset}-{'' if size is None else offset + size - 1}"
    if etag:
        kw["IfMatch"] = etag
    if size == 0:
        return b""
    return _call(url, "GET", lambda: client().get_object(**kw)["Body"].read())


def download(url: ObjectURL, path, etag: str | None = None) -> None:
    """The whole object into the local file `path` (streamed, not held in memory)."""
    kw = {"Bucket": url.bucket, "Key": url.key, **({"IfMatch": etag} if etag else {})}

    def fetch():
        body = client().get_object(**kw)["Body"]
        with open(path, "wb") as f:
            for chunk in body.iter_chunks(1 << 20):
                f.write(chunk)

    _call(url, "GET", fetch)


def write(url: ObjectURL, data: bytes) -> str:
    """Put `data` at `url` (whole: an object is never seen half-written); returns its ETag."""
    r = _call(url, "PUT", lambda: client().put_object(Bucket=url.bucket, Key=url.key, Body=data))
    return r["ETag"]


def delete(url: ObjectURL) -> None:
    _call(url, "DELETE", lambda: client().delete_object(Bucket=url.bucket, Key=url.key))


def list_keys(prefix: ObjectURL) -> list[str]:
    """Every key under the prefix, sorted."""
    keys: list[str] = []
    token = None
    while True:
        kw = {"Bucket": prefix.bucket, "Prefix": prefix.key, **({"ContinuationToken": token} if token else {})}
        page = _call(prefix, "LIST", lambda kw=kw: client().list_objects_v2(**kw))
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return sorted(keys)
        token = page["NextContinuationToken"]
