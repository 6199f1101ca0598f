"""An OCI Object Storage endpoint on loopback, for the real `oci` SDK (see `testbed.fakes.oci_common`).

It implements what our code uses, with OCI's paths, headers and error shapes: the namespace; buckets
(create, get, head); objects (put, get, head, list, delete) with `opc-meta-*` metadata,
`Content-MD5` checks and conditional requests (`if-none-match: *`, `if-match: <etag>`, 412 otherwise); pre-authenticated requests (create, and fetching through the returned URL,
read-only, until they expire); and multipart uploads (create, upload part, list parts, commit,
abort, list), which the SDK's `UploadManager` uses for large files.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from testbed.fakes.oci_common import (COMPARTMENT_ID, OCIFakeServer, Reply, Request, error_reply, http_date, json_reply,
                                      rfc3339)

_BUCKET = r"/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)"
ROUTES = [
    ("GET", re.compile(r"/n/?"), "get_namespace"),
    ("POST", re.compile(r"/n/(?P<ns>[^/]+)/b/?"), "create_bucket"),
    ("GET", re.compile(_BUCKET + r"/?"), "get_bucket"),
    ("HEAD", re.compile(_BUCKET + r"/?"), "get_bucket"),
    ("GET", re.compile(_BUCKET + r"/o/?"), "list_objects"),
    ("PUT", re.compile(_BUCKET + r"/o/(?P<name>.+)"), "put_object"),
    ("GET", re.compile(_BUCKET + r"/o/(?P<name>.+)"), "get_object"),
    ("HEAD", re.compile(_BUCKET + r"/o/(?P<name>.+)"), "get_object"),
    ("DELETE", re.compile(_BUCKET + r"/o/(?P<name>.+)"), "delete_object"),
    ("POST", re.compile(_BUCKET + r"/p/?"), "create_par"),
    ("PUT", re.compile(_BUCKET + r"/l/?"), "put_lifecycle_policy"),
    ("POST", re.compile(_BUCKET + r"/u/?"), "create_multipart_upload"),
    ("GET", re.compile(_BUCKET + r"/u/?"), "list_multipart_uploads"),
    ("PUT", re.compile(_BUCKET + r"/u/(?P<name>.+)"), "upload_part"),
    ("GET", re.compile(_BUCKET + r"/u/(?P<name>.+)"), "list_parts"),
    ("POST", re.compile(_BUCKET + r"/u/(?P<name>.+)"), "commit_multipart_upload"),
    ("DELETE", re.compile(_BUCKET + r"/u/(?P<name>.+)"), "abort_multipart_upload"),
]
PAR_PATH = re.compile(r"/p/(?P<token>[^/]+)" + _BUCKET + r"/o/(?P<name>.+)")
PAR_ACCESS_TYPES = {"ObjectRead", "ObjectWrite", "ObjectReadWrite", "AnyObjectRead", "AnyObjectWrite",
                    "AnyObjectReadWrite"}


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


@dataclass
class StoredObject:
    """An object as the fake holds it; `metadata` has the `opc-meta-` names without the prefix."""

    data: bytes
    content_type: str
    metadata: dict[str, str]
    md5: str
    etag: str = field(default_factory=lambda: uuid.uuid4().hex)
    time_created: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    multipart_md5: str | None = None


@dataclass
class PreauthenticatedRequest:
    id: str
    name: str
    bucket: str
    object_name: str | None
    access_type: str
    time_expires: dt.datetime
    access_uri: str
    time_created: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))


@dataclass
class MultipartUpload:
    upload_id: str
    bucket: str
    object_name: str
    content_type: str
    metadata: dict[str, str]
    parts: dict[int, StoredObject] = field(default_factory=dict)
    time_created: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))


class FakeObjectStorage(OCIFakeServer):
    """Object Storage for one namespace.

    Args:
        namespace: the tenancy's namespace, as `GET /n` answers it.
        buckets: buckets that exist from the start.
        keys: key id -> public key of the callers to accept (or call `trust(credentials)`).
    """

    def __init__(self, namespace: str = "testnamespace", buckets: tuple[str, ...] = ("images",), keys=None):
        super().__init__(keys)
        self.namespace = namespace
        self.buckets: dict[str, dict[str, StoredObject]] = {name: {} for name in buckets}
        self.pars: dict[str, PreauthenticatedRequest] = {}
        self.uploads: dict[str, MultipartUpload] = {}
        self.lifecycle_rules: dict[str, list[dict]] = {}  # bucket -> its lifecycle policy's rules, as sent

    # -- what tests read back

    def object(self, bucket: str, name: str) -> StoredObject | None:
        with self.lock:
            return self.buckets.get(bucket, {}).get(name)

    def add_object(self, bucket: str, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Put an object in place directly, as if someone had uploaded it."""
        with self.lock:
            self.buckets[bucket][name] = StoredObject(data=data, content_type=content_type, metadata={},
                                                      md5=_md5(data))

    def names(self, bucket: str) -> list[str]:
        with self.lock:
            return sorted(self.buckets.get(bucket, {}))

    # -- routing

    def is_public(self, request: Request) -> bool:
        return request.path.startswith("/p/")

    def body_signed(self, request: Request) -> bool:
        # Object data is not hashed into the signature: PutObject and UploadPart are exempt on OCI too.
        if request.method == "PUT" and re.fullmatch(_BUCKET + r"/[ou]/.+", request.path):
            return False
        return super().body_signed(request)

    def route(self, request: Request) -> Reply:
        if self.is_public(request):
            return self._par_access(request)
        for method, pattern, handler in ROUTES:
            match = pattern.fullmatch(request.path)
            if match and method == request.method:
                params = {key: unquote(value) for key, value in match.groupdict().items()}
                if "ns" in params and params["ns"] != self.namespace:
                    return error_reply(404, "NamespaceNotFound", f"namespace '{params['ns']}' not found")
                if "bucket" in params and params["bucket"] not in self.buckets:
                    return error_reply(404, "BucketNotFound", f"Either the bucket named '{params['bucket']}' "
                                       f"does not exist in the namespace '{self.namespace}' or you are not "
                                       "authorized to access it")
                return getattr(self, "_" + handler)(request, **params)
        return error_reply(404, "NotFound", f"no route for {request.method} {request.path}")

    # -- namespace and buckets

    def _get_namespace(self, request: Request) -> Reply:
        return json_reply(200, self.namespace)

    def _bucket_json(self, name: str) -> dict:
        return {"namespace": self.namespace, "name": name, "compartmentId": COMPARTMENT_ID,
                "createdBy": "ocid1.user.oc1..fake", "timeCreated": "2026-01-01T00:00:00.000Z",
                "etag": hashlib.md5(name.encode()).hexdigest(), "publicAccessType": "NoPublicAccess",
                "storageTier": "Standard"}

    def _create_bucket(self, request: Request, ns: str) -> Reply:
        name = request.json()["name"]
        if name in self.buckets:
            return error_reply(409, "BucketAlreadyExists", f"bucket '{name}' already exists")
        self.buckets[name] = {}
        return json_reply(200, self._bucket_json(name))

    def _get_bucket(self, request: Request, ns: str, bucket: str) -> Reply:
        reply = json_reply(200, self._bucket_json(bucket))
        reply.headers["etag"] = self._bucket_json(bucket)["etag"]
        return reply

    # -- objects

    def _precondition_failed(self, request: Request, existing: StoredObject | None) -> Reply | None:
        """OCI's conditional requests: `if-none-match: *` (only if absent) and `if-match: <etag>` (only if unchanged)."""
        if request.headers.get("if-none-match") == "*" and existing is not None:
            return error_reply(412, "IfNoneMatchFailed", "The If-None-Match header is '*' but there is an existing "
                               "entity")
        expected = request.headers.get("if-match")
        if expected is not None and (existing is None or existing.etag != expected):
            return error_reply(412, "IfMatchFailed", f"The If-Match header was '{expected}' but the current etag is "
                               f"'{existing.etag if existing else '(no object)'}'")
        return None

    def _put_object(self, request: Request, ns: str, bucket: str, name: str) -> Reply:
        refused = self._precondition_failed(request, self.buckets[bucket].get(name))
        if refused is not None:
            return refused
        md5 = _md5(request.body)
        if "content-md5" in request.headers and request.headers["content-md5"] != md5:
            return error_reply(400, "UnmatchedContentMD5", "The computed MD5 of the request body does not "
                               "match the Content-MD5 header")
        stored = StoredObject(
            data=request.body,
            content_type=request.headers.get("content-type", "application/octet-stream"),
            metadata={k[len("opc-meta-"):]: v for k, v in request.headers.items() if k.startswith("opc-meta-")},
            md5=md5,
        )
        self.buckets[bucket][name] = stored
        return Reply(200, headers={"etag": stored.etag, "opc-content-md5": md5,
                                   "last-modified": http_date(stored.time_created)})

    def _object_reply(self, request: Request, stored: StoredObject) -> Reply:
        headers = {"content-type": stored.content_type, "content-length": str(len(stored.data)),
                   "etag": stored.etag, "last-modified": http_date(stored.time_created)}
        headers["opc-multipart-md5" if stored.multipart_md5 else "content-md5"] = stored.multipart_md5 or stored.md5
        headers.update({f"opc-meta-{k}": v for k, v in stored.metadata.items()})
        return Reply(200, b"" if request.method == "HEAD" else stored.data, headers)

    def _get_object(self, request: Request, ns: str, bucket: str, name: str) -> Reply:
        stored = self.buckets[bucket].get(name)
        if stored is None:
            return error_reply(404, "ObjectNotFound", f"The object '{name}' was not found in the bucket '{bucket}'")
        return self._object_reply(request, stored)

    def _delete_object(self, request: Request, ns: str, bucket: str, name: str) -> Reply:
        refused = self._precondition_failed(request, self.buckets[bucket].get(name))
        if refused is not None:
            return refused
        if self.buckets[bucket].pop(name, None) is None:
            return error_reply(404, "ObjectNotFound", f"The object '{name}' was not found in the bucket '{bucket}'")
        return Reply(204)

    def _list_objects(self, request: Request, ns: str, bucket: str) -> Reply:
        prefix = request.query.get("prefix", "")
        objects = [{"name": name, "size": len(o.data), "md5": o.md5, "etag": o.etag,
                    "timeCreated": rfc3339(o.time_created)}
                   for name, o in sorted(self.buckets[bucket].items()) if name.startswith(prefix)]
        return json_reply(200, {"objects": objects, "prefixes": []})

    # -- lifecycle policies

    def _put_lifecycle_policy(self, request: Request, ns: str, bucket: str) -> Reply:
        items = request.json().get("items") or []
        if any(item.get("action") not in ("ARCHIVE", "DELETE", "INFREQUENT_ACCESS", "ABORT") for item in items):
            return error_reply(400, "InvalidParameter", "each rule's action must be ARCHIVE, DELETE, "
                               "INFREQUENT_ACCESS or ABORT")
        self.lifecycle_rules[bucket] = items
        return json_reply(200, {"items": items, "timeCreated": rfc3339(dt.datetime.now(dt.timezone.utc))})

    # -- pre-authenticated requests

    def _create_par(self, request: Request, ns: str, bucket: str) -> Reply:
        details = request.json()
        access_type = details.get("accessType")
        if access_type not in PAR_ACCESS_TYPES:
            return error_reply(400, "InvalidParameter", f"accessType must be one of {sorted(PAR_ACCESS_TYPES)}")
        expires = dt.datetime.fromisoformat(details["timeExpires"].replace("Z", "+00:00"))
        if expires <= dt.datetime.now(dt.timezone.utc):
            return error_reply(400, "InvalidParameter", "timeExpires must be in the future")
        object_name = details.get("objectName")
        token = secrets.token_urlsafe(32)
        access_uri = f"/p/{token}/n/{self.namespace}/b/{bucket}/o/" + (quote(object_name, safe="") if object_name else "")
        par = PreauthenticatedRequest(id=uuid.uuid4().hex, name=details["name"], bucket=bucket,
                                      object_name=object_name, access_type=access_type, time_expires=expires,
                                      access_uri=access_uri)
        self.pars[token] = par
        return json_reply(200, {
            "id": par.id, "name": par.name, "accessUri": access_uri, "objectName": object_name,
            "accessType": access_type, "timeExpires": rfc3339(expires), "timeCreated": rfc3339(par.time_created),
            "fullPath": self.endpoint + access_uri,
        })

    def _par_access(self, request: Request) -> Reply:
        match = PAR_PATH.fullmatch(request.path)
        par = self.pars.get(match["token"]) if match else None
        if par is None or par.time_expires <= dt.datetime.now(dt.timezone.utc):
            return error_reply(404, "NotAuthorizedOrNotFound", "the pre-authenticated request does not exist "
                               "or has expired")
        name = unquote(match["name"])
        if par.object_name is not None and name != par.object_name:
            return error_reply(404, "NotAuthorizedOrNotFound", "the pre-authenticated request is for another object")
        reads = request.method in ("GET", "HEAD")
        if reads != ("Read" in par.access_type) and not par.access_type.endswith("ReadWrite"):
            return error_reply(403, "NotAllowed", f"a {par.access_type} pre-authenticated request does not allow "
                               f"{request.method}")
        if not reads:
            return error_reply(403, "NotAllowed", "the fake only serves reads through pre-authenticated requests")
        stored = self.buckets[par.bucket].get(name)
        if stored is None:
            return error_reply(404, "ObjectNotFound", f"The object '{name}' was not found")
        return self._object_reply(request, stored)

    # -- multipart uploads

    def _upload(self, request: Request, bucket: str, name: str) -> MultipartUpload | Reply:
        upload = self.uploads.get(request.query.get("uploadId", ""))
        if upload is None or upload.bucket != bucket or upload.object_name != name:
            return error_reply(404, "NoSuchUpload", "the multipart upload does not exist")
        return upload

    def _create_multipart_upload(self, request: Request, ns: str, bucket: str) -> Reply:
        details = request.json()
        upload = MultipartUpload(upload_id=uuid.uuid4().hex, bucket=bucket, object_name=details["object"],
                                 content_type=details.get("contentType") or "application/octet-stream",
                                 metadata={k.removeprefix("opc-meta-"): v
                                           for k, v in (details.get("metadata") or {}).items()})
        self.uploads[upload.upload_id] = upload
        return json_reply(200, {"namespace": self.namespace, "bucket": bucket, "object": upload.object_name,
                                "uploadId": upload.upload_id, "timeCreated": rfc3339(upload.time_created),
                                "storageTier": "Standard"})

    def _list_multipart_uploads(self, request: Request, ns: str, bucket: str) -> Reply:
        return json_reply(200, [{"namespace": self.namespace, "bucket": bucket, "object": u.object_name,
                                 "uploadId": u.upload_id, "timeCreated": rfc3339(u.time_created)}
                                for u in self.uploads.values() if u.bucket == bucket])

    def _upload_part(self, request: Request, ns: str, bucket: str, name: str) -> Reply:
        upload = self._upload(request, bucket, name)
        if isinstance(upload, Reply):
            return upload
        number = int(request.query.get("uploadPartNum", "0"))
        if not 1 <= number <= 10000:
            return error_reply(400, "InvalidParameter", "uploadPartNum must be 1-10000")
        md5 = _md5(request.body)
        if "content-md5" in request.headers and request.headers["content-md5"] != md5:
            return error_reply(400, "UnmatchedContentMD5", "The computed MD5 of the part does not match Content-MD5")
        part = StoredObject(data=request.body, content_type="application/octet-stream", metadata={}, md5=md5)
        upload.parts[number] = part
        return Reply(200, headers={"etag": part.etag, "opc-content-md5": md5})

    def _list_parts(self, request: Request, ns: str, bucket: str, name: str) -> Reply:
        upload = self._upload(request, bucket, name)
        if isinstance(upload, Reply):
            return upload
        return json_reply(200, [{"partNumber": n, "etag": p.etag, "md5": p.md5, "size": len(p.data)}
                                for n, p in sorted(upload.parts.items())])

    def _commit_multipart_upload(self, request: Request, ns: str, bucket: str, name: str) -> Reply:
        upload = self._upload(request, bucket, name)
        if isinstance(upload, Reply):
            return upload
        wanted = sorted(request.json().get("partsToCommit") or [], key=lambda p: p["partNum"])
        if not wanted:
            return error_reply(400, "InvalidParameter", "partsToCommit is empty")
        parts = []
        for detail in wanted:
            part = upload.parts.get(detail["partNum"])
            if part is None or part.etag != detail.get("etag"):
                return error_reply(400, "InvalidUploadPart", f"part {detail['partNum']} is missing or its etag "
                                   "does not match")
            parts.append(part)
        data = b"".join(p.data for p in parts)
        # OCI's multipart MD5: the MD5 of the parts' binary MD5s, then "-<number of parts>".
        joined = hashlib.md5(b"".join(base64.b64decode(p.md5) for p in parts)).digest()
        stored = StoredObject(data=data, content_type=upload.content_type, metadata=upload.metadata,
                              md5=_md5(data), multipart_md5=f"{base64.b64encode(joined).decode()}-{len(parts)}")
        self.buckets[bucket][name] = stored
        del self.uploads[upload.upload_id]
        return Reply(200, headers={"etag": stored.etag, "opc-multipart-md5": stored.multipart_md5,
                                   "last-modified": http_date(stored.time_created)})

    def _abort_multipart_upload(self, request: Request, ns: str, bucket: str, name: str) -> Reply:
        upload = self._upload(request, bucket, name)
        if isinstance(upload, Reply):
            return upload
        del self.uploads[upload.upload_id]
        return Reply(204)
