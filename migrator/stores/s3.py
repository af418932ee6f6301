"""S3 API endpoints: a client per region, and a streamed copy between two endpoints.

Data centers do not share an endpoint, so a copy is a GET from one and a PUT (multipart
above the threshold) to the other, never a server-side copy. The body is read in parts, so
at most one part per thread is in memory. The SHA-256 of the bytes is computed while
streaming. The destination object carries the source's ETag (and, below the multipart
threshold, its SHA-256), so a rerun recognises an object it already copied from this very
source version and skips it without crossing data centers again.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from migrator.errors import ObjectMissing, ObjectRefused, ObjectVanished, TransientError
from migrator.spec import ObjectStore

META_SHA = "sha256"
META_SRC_ETAG = "source-etag"


# PreconditionFailed: a source object changed between its listing and the GET conditional
# on the listed ETag; the retry lists the batch again.
_TRANSIENT_CODES = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "PreconditionFailed"}


def transient(exc: BaseException) -> bool:
    """Whether an error an S3 endpoint's client raised is one a retry can mend: a broken
    or timed-out connection, throttling, a 5xx."""
    from botocore.exceptions import ClientError, HTTPClientError, ReadTimeoutError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    # HTTPClientError: the connection closed or broke mid-request (ConnectionClosedError)
    if isinstance(exc, (BotoConnectionError, ReadTimeoutError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or code in _TRANSIENT_CODES
    return False


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def client(store: ObjectStore):
    """One client per endpoint and credentials for the process: a client is safe to share
    between threads, and making one (loading the service's model) costs a good part of a
    small shard's object copy."""
    access = store.access_key.get_secret_value() if store.access_key else None
    secret = store.secret_key.get_secret_value() if store.secret_key else None
    key = (store.endpoint, store.region_name, access, secret)
    # imported here: boto3 takes a fifth of a second to import, which every Airflow task
    # would pay whether or not its spec has objects
    import boto3
    from botocore.config import Config

    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            c = _clients[key] = boto3.client(
                "s3",
                endpoint_url=store.endpoint,
                region_name=store.region_name,
                aws_access_key_id=access,
                aws_secret_access_key=secret,
                config=Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 1}, max_pool_connections=64),
            )
        return c


@dataclass(frozen=True)
class Copied:
    key: str
    size: int
    sha256: str
    skipped: bool


def head(c, bucket: str, key: str) -> dict | None:
    try:
        return c.head_object(Bucket=bucket, Key=key)
    except c.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def copy_object(
    src,
    src_bucket: str,
    dst,
    dst_bucket: str,
    key: str,
    threshold: int,
    part_size: int,
    src_etag: str | None = None,
    dst_head: dict | None = None,
) -> Copied:
    """Stream one object across endpoints; skip it when the destination already holds this
    source version (same ETag) with its SHA-256 recorded.

    `src_etag` is the source ETag a listing gave (the GET is then conditional on it, so a
    version changed since the listing fails rather than being copied unnoticed);
    `dst_head` is the destination's HEAD when the caller found the key there (None: absent)."""
    if dst_head is not None:
        src_head = src.head_object(Bucket=src_bucket, Key=key)
        etag = src_head["ETag"].strip('"')
        meta = dst_head.get("Metadata", {})
        if meta.get(META_SRC_ETAG) == etag and dst_head["ContentLength"] == src_head["ContentLength"]:
            sha_hex = meta.get(META_SHA) or _sha_of(dst, dst_bucket, key, part_size)
            return Copied(key, dst_head["ContentLength"], sha_hex, True)
        src_etag = src_head["ETag"]
    try:
        got = src.get_object(Bucket=src_bucket, Key=key, **({"IfMatch": src_etag} if src_etag else {}))
    except src.exceptions.NoSuchKey:
        if src_etag is None:
            raise ObjectMissing(
                f"source object {key!r} (named by the key column) is not in bucket {src_bucket!r}"
            ) from None
        raise ObjectVanished(f"source object {key!r} was deleted after it was listed") from None
    etag = got["ETag"].strip('"')
    body = got["Body"]
    size = got["ContentLength"]
    sha = hashlib.sha256()
    if size < threshold:
        data = body.read()
        sha.update(data)
        dst.put_object(Bucket=dst_bucket, Key=key, Body=data, Metadata={META_SHA: sha.hexdigest(), META_SRC_ETAG: etag})
        return Copied(key, len(data), sha.hexdigest(), False)
    # Multipart: the source ETag goes on the object at creation; its SHA-256 is known only
    # at the end and goes to the shard's manifest (a skip later re-reads it locally).
    up = dst.create_multipart_upload(Bucket=dst_bucket, Key=key, Metadata={META_SRC_ETAG: etag})
    parts, n, total = [], 1, 0
    try:
        while chunk := body.read(part_size):
            sha.update(chunk)
            total += len(chunk)
            r = dst.upload_part(Bucket=dst_bucket, Key=key, UploadId=up["UploadId"], PartNumber=n, Body=chunk)
            parts.append({"ETag": r["ETag"], "PartNumber": n})
            n += 1
        dst.complete_multipart_upload(
            Bucket=dst_bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
        )
    except BaseException:
        dst.abort_multipart_upload(Bucket=dst_bucket, Key=key, UploadId=up["UploadId"])
        raise
    return Copied(key, total, sha.hexdigest(), False)


def _sha_of(c, bucket: str, key: str, part_size: int) -> str:
    """The SHA-256 of an object that a HEAD just found; gone since, the batch is listed again."""
    found = content_sha256(c, bucket, key, part_size)
    if found is None:
        raise ObjectVanished(f"object {key!r} in bucket {bucket} was deleted while it was being checked")
    return found[1]


def content_sha256(c, bucket: str, key: str, part_size: int) -> tuple[int, str] | None:
    """Size and SHA-256 of an object's bytes, read in parts; None when it is missing."""
    try:
        body = c.get_object(Bucket=bucket, Key=key)["Body"]
    except c.exceptions.NoSuchKey:
        return None
    sha, size = hashlib.sha256(), 0
    while chunk := body.read(part_size):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()


DELETE_CHUNK = 1000  # the most keys one DeleteObjects request takes
_RETRY_CODES = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout"}


def delete_keys(c, bucket: str, targets: list[dict[str, str]]) -> None:
    """Delete the targets (`{"Key": k}`, or with `"VersionId"` one version of it) in
    DeleteObjects requests of up to a thousand. The request succeeds even when some keys
    could not be deleted; those come back in its `Errors`, which are raised here: as a
    transient error when every one is retryable, otherwise as a refusal naming the bucket,
    the first key and its code. Deleting a key or version already gone succeeds."""
    for i in range(0, len(targets), DELETE_CHUNK):
        chunk = targets[i : i + DELETE_CHUNK]
        errors = c.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True}).get("Errors", [])
        if not errors:
            continue
        first = errors[0]
        what = (
            f"S3 DeleteObjects at {c.meta.endpoint_url}, bucket {bucket!r}: {len(errors)} of {len(chunk)} "
            f"object(s) not deleted (first: {first.get('Key')!r}, {first.get('Code')})"
        )
        if all(e.get("Code") in _RETRY_CODES for e in errors):
            raise TransientError(what)
        raise ObjectRefused(what)
