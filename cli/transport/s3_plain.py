"""The few S3 requests of a small push, signed here (AWS Signature Version 4) and sent with
http.client, without aiobotocore: importing aiohttp, botocore and aiobotocore and creating
a client cost a push ~0.25 s of CPU (bench/README.md, exchange), against a whole incremental
push of a 1% change in ~0.3 s otherwise.

Only where botocore would send the very same requests: an explicit endpoint (`--endpoint-url`,
an attached storage's, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL: an S3-compatible service, to
which botocore sends path-style URLs) over http, or over https verified against the CA
bundle botocore uses (AWS_CA_BUNDLE, else certifi's), explicit keys (the storage's, or
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, with AWS_SESSION_TOKEN), no AWS profile or
config file (which may change addressing, endpoints, credentials or the CA bundle) and no
proxy on the way.
Anything else goes through aiobotocore, as does everything but the push's stat (HEAD,
ListObjectsV2, ListMultipartUploads, the ranged GETs of manifests) and the PutObject of a
file smaller than one part (cli/transport/s3.py). Every payload is signed with its SHA-256,
which S3 checks.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import http.client
import os
import random
import re
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote_plus, urlsplit

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
TIMEOUT = 30  # seconds for a connection or an answer (botocore's connect timeout here)
ATTEMPTS = 3  # s3.S3Store.client's retries: {"max_attempts": 3, "mode": "standard"}
RETRY_WAIT_MAX = 20  # seconds, botocore's cap
_TRANSIENT_CODES = frozenset(
    {
        "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
        "TooManyRequestsException", "ProvisionedThroughputExceededException",
        "TransactionInProgressException", "RequestLimitExceeded", "BandwidthLimitExceeded",
        "LimitExceededException", "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
        "EC2ThrottledException", "RequestTimeout", "RequestTimeoutException",
        "InternalError",
    }
)  # fmt: skip
"""botocore's standard retry mode's throttling and transient error codes."""
_UNRESERVED = "-_.~"
_TAG = r"<{0}>([^<]*)</{0}>"


class PlainS3Error(Exception):
    """An S3 error answer, shaped as botocore's ClientError.response for s3._client_error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code} {message}".strip())
        self.response: dict[str, Any] = {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }


class PlainS3Unreachable(Exception):
    """The endpoint could not be reached or answered no HTTP."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass(frozen=True, slots=True)
class PlainS3:
    """An S3-compatible endpoint reached path-style with these keys, over http, or over
    https trusting the certificates of `cafile` only (botocore's: AWS_CA_BUNDLE, else
    certifi's bundle)."""

    netloc: str  # the Host header
    hostname: str
    port: int
    region: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    cafile: str | None = None  # None: plain http

    @staticmethod
    def of(
        endpoint: str, region: str, key: str, secret: str, token: str | None,
        cafile: str | None = None,
    ) -> PlainS3:  # fmt: skip
        parts = urlsplit(endpoint)
        netloc = parts.netloc.rpartition("@")[2]
        tls = parts.scheme.lower() == "https"
        port = parts.port or (443 if tls else 80)
        if tls and cafile is None:
            raise ValueError("an https endpoint needs the CA file its certificate is checked with")
        return PlainS3(
            netloc, parts.hostname or "", port, region, key, secret, token,
            cafile if tls else None,
        )  # fmt: skip

    def signed_headers(
        self, method: str, path: str, query: list[tuple[str, str]], headers: dict[str, str],
        payload_sha256: str, now: datetime.datetime,
    ) -> dict[str, str]:  # fmt: skip
        """`headers` with the SigV4 ones added (`path` already percent-encoded)."""
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        out = {k.lower(): v for k, v in headers.items()}
        out.update(
            {"host": self.netloc, "x-amz-date": stamp, "x-amz-content-sha256": payload_sha256}
        )
        if self.session_token:
            out["x-amz-security-token"] = self.session_token
        names = sorted(out)
        canonical = "\n".join(
            [
                method,
                path,
                canonical_query(query),
                "".join(f"{n}:{' '.join(out[n].split())}\n" for n in names),
                ";".join(names),
                payload_sha256,
            ]
        )
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key = f"AWS4{self.secret_access_key}".encode()
        for part in (stamp[:8], self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        out["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key_id}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        return out

    async def request(
        self, method: str, bucket: str, key: str = "", query: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None, body: bytes = b"",
    ) -> Answer:  # fmt: skip
        """One signed request; an error answer (status >= 300) raises PlainS3Error. A lost
        connection, a 5xx or a throttling answer is tried again, ATTEMPTS in all, as
        botocore's standard retry mode does (with its exponential, jittered waits)."""
        path = object_path(bucket, key)
        query = query or []
        digest = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        target = path + ("?" + canonical_query(query) if query else "")
        for attempt in range(ATTEMPTS):
            now = datetime.datetime.now(datetime.UTC)
            sent = self.signed_headers(method, path, query, headers or {}, digest, now)
            try:
                answer = await asyncio.to_thread(self._send, method, target, sent, body)
            except PlainS3Unreachable:
                if attempt + 1 == ATTEMPTS:
                    raise
            else:
                if answer.status < 300:
                    return answer
                code = _tag("Code", answer.body) or str(answer.status)
                error = PlainS3Error(answer.status, code, _tag("Message", answer.body))
                if attempt + 1 == ATTEMPTS or not _transient(answer.status, code):
                    raise error
            await asyncio.sleep(random.random() * min(RETRY_WAIT_MAX, 2**attempt))
        raise AssertionError("unreachable")

    def _send(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        conn: http.client.HTTPConnection
        try:
            if self.cafile is None:
                conn = http.client.HTTPConnection(self.hostname, self.port, timeout=TIMEOUT)
            else:
                conn = http.client.HTTPSConnection(
                    self.hostname, self.port, timeout=TIMEOUT, context=_tls_context(self.cafile)
                )
        except (OSError, ValueError) as exc:  # a CA file that cannot be read
            raise PlainS3Unreachable(f"cannot use the CA bundle {self.cafile}: {exc}") from None
        try:
            conn.request(method, target, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        except (OSError, http.client.HTTPException) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            scheme = "http" if self.cafile is None else "https"
            raise PlainS3Unreachable(
                f"could not connect to the endpoint URL {scheme}://{self.netloc}: {reason}"
            ) from None
        finally:
            conn.close()

    async def head(self, bucket: str, key: str) -> int | None:
        """The object's size; None: no such key."""
        try:
            answer = await self.request("HEAD", bucket, key)
        except PlainS3Error as exc:
            if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
                return None
            raise
        return int(answer.headers["content-length"])

    async def list_directory(
        self, bucket: str, prefix: str, max_keys: int | None = None
    ) -> list[tuple[str, int]]:
        """(key, size) of the keys directly under `prefix` (ListObjectsV2, delimiter "/"),
        `max_keys` an answer (the service's default: 1000)."""
        found: list[tuple[str, int]] = []
        token = None
        while True:
            query = [("list-type", "2"), ("prefix", prefix), ("delimiter", "/")]
            query.append(("encoding-type", "url"))
            if max_keys is not None:
                query.append(("max-keys", str(max_keys)))
            if token is not None:
                query.append(("continuation-token", token))
            body = (await self.request("GET", bucket, query=query)).body
            for entry in re.findall(rb"<Contents>(.*?)</Contents>", body, re.S):
                found.append((unquote_plus(_tag("Key", entry)), int(_tag("Size", entry))))
            if _tag("IsTruncated", body) != "true":
                return found
            token = _tag("NextContinuationToken", body)

    async def has_uploads(self, bucket: str, key: str) -> bool:
        """Whether multipart uploads of `key` may be pending (a truncated answer: maybe)."""
        query = [("uploads", ""), ("prefix", key)]
        body = (await self.request("GET", bucket, query=query)).body
        keys = re.findall(rb"<Upload>.*?<Key>([^<]*)</Key>", body, re.S)
        return _tag("IsTruncated", body) == "true" or any(_text(k) == key for k in keys)

    async def get_range(self, bucket: str, key: str, first: int, last: int) -> bytes:
        headers = {"Range": f"bytes={first}-{last}"}
        return (await self.request("GET", bucket, key, headers=headers)).body

    async def put(self, bucket: str, key: str, body: bytes, headers: dict[str, str]) -> None:
        await self.request("PUT", bucket, key, headers=headers, body=body)


_TLS_CONTEXTS: dict[str, ssl.SSLContext] = {}


def _tls_context(cafile: str) -> ssl.SSLContext:
    """A verifying TLS context trusting `cafile` (made once: loading a bundle costs ~20 ms)."""
    context = _TLS_CONTEXTS.get(cafile)
    if context is None:
        context = _TLS_CONTEXTS[cafile] = ssl.create_default_context(cafile=cafile)
    return context


def _transient(status: int, code: str) -> bool:
    return status in (500, 502, 503, 504) or code in _TRANSIENT_CODES


def object_path(bucket: str, key: str = "") -> str:
    """A path-style request's path, percent-encoded as botocore encodes it (SigV4's canonical
    URI for S3 is this very path)."""
    return "/" + quote(bucket, safe=_UNRESERVED) + ("/" + quote(key, safe="/~") if key else "")


def canonical_query(query: list[tuple[str, str]]) -> str:
    """SigV4's query string: each name and value percent-encoded, sorted."""
    pairs = sorted((quote(k, safe=_UNRESERVED), quote(v, safe=_UNRESERVED)) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _text(raw: bytes) -> str:
    """An XML text node's characters (S3's answers escape only these)."""
    text = raw.decode()
    for entity, char in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'")):
        text = text.replace(entity, char)
    return text.replace("&amp;", "&")


def _tag(name: str, xml: bytes) -> str:
    """The text of the first <name> element of `xml` ("" if none)."""
    found = re.search(_TAG.format(name).encode(), xml)
    return _text(found.group(1)) if found else ""


def plain_client(
    endpoint: str | None, region: str, key_id: str | None, secret: str | None
) -> PlainS3 | None:
    """A PlainS3 when botocore would send its requests exactly so (module docstring), else
    None. `endpoint`, `key_id`, `secret`: the ones given for this process (s3.use_settings),
    the environment's otherwise."""
    env = os.environ
    if endpoint is None and env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true":
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint is None or not endpoint.lower().startswith(("http://", "https://")):
        return None
    parts = urlsplit(endpoint)
    if parts.path not in ("", "/") or parts.query or parts.username is not None:
        return None  # a path botocore puts before the bucket, credentials in the URL: its way
    cafile = None
    if endpoint.lower().startswith("https://"):
        cafile = env.get("AWS_CA_BUNDLE") or _certifi_bundle()
        if cafile is None:
            return None
    if env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE"):
        return None
    config = env.get("AWS_CONFIG_FILE") or os.path.join("~", ".aws", "config")
    if os.path.exists(os.path.expanduser(config)) or proxied(endpoint):
        return None
    token = None
    if key_id is None or secret is None:
        key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        token = env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN") or None
    if not key_id or not secret:
        return None
    return PlainS3.of(endpoint, region, key_id, secret, token, cafile)


def _certifi_bundle() -> str | None:
    """The CA bundle botocore verifies with by default: certifi's, when installed (else
    botocore's own copy, which is left to it)."""
    try:
        import certifi
    except ImportError:
        return None
    return str(certifi.where())


def proxied(url: str) -> bool:
    """Whether a proxy from the environment (HTTP_PROXY and the like, as botocore reads
    them) would carry requests to `url` (then an https proxy's certificate is checked, and
    nothing goes the plain way)."""
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(url)
    proxies = getproxies()
    if not (proxies.get(parts.scheme.lower()) or proxies.get("all")):
        return False
    return not proxy_bypass(parts.hostname or "")
