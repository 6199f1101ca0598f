"""OCI Vault's secrets endpoint on loopback, for the real `oci` SDK (see `testbed.fakes.oci_common`).

`GET /20190301/secretbundles/{secretId}` answers the secret's current version as the SDK's `SecretsClient`
reads it (`secretBundleContent` in base64), to a signed call only; `add_secret` sets what it holds, and
`seen()` tells which secrets were read and by whom.
"""

from __future__ import annotations

import base64
import re

from testbed.fakes.oci_common import OCIFakeServer, Reply, Request, error_reply, json_reply

BUNDLE = re.compile(r"/20190301/secretbundles/(?P<id>[^/?]+)")


class FakeSecrets(OCIFakeServer):
    """Vault secrets by OCID."""

    def __init__(self):
        super().__init__()
        self.secrets: dict[str, str] = {}

    def add_secret(self, secret_id: str, value: str) -> None:
        with self.lock:
            self.secrets[secret_id] = value

    def route(self, request: Request) -> Reply:
        match = BUNDLE.fullmatch(request.path)
        if request.method != "GET" or match is None:
            return error_reply(404, "NotAuthorizedOrNotFound", f"no route {request.method} {request.path}")
        value = self.secrets.get(match["id"])
        if value is None:
            return error_reply(404, "NotAuthorizedOrNotFound", f"Secret {match['id']} not found")
        return json_reply(200, {
            "secretId": match["id"], "versionNumber": 1, "stages": ["CURRENT", "LATEST"],
            "secretBundleContent": {"contentType": "BASE64", "content": base64.b64encode(value.encode()).decode()}})
