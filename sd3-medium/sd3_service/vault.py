"""Secrets out of the deployment's environment: read from OCI Vault at start, with the service's own credentials.

Anyone who may read a Model Deployment sees its environment variables; `WEBHOOK_SECRET_OCID` and
`HF_TOKEN_SECRET_OCID` name Vault secrets instead, which the service reads once at start with the `oci` SDK's
secrets client, signed as `OCI_AUTH` says (the deployment's resource principal on Model Deployment). The value is
never logged.
"""

from __future__ import annotations

import base64
import logging

log = logging.getLogger("sd3")


def read_vault_secret(settings, secret_id: str) -> str:
    """The current version of Vault secret `secret_id`, as text; `RuntimeError` naming the secret (never its value)
    when it cannot be read."""
    import oci

    from sd3_service.storage.object_storage import build_signer

    try:
        signer, config = build_signer(settings.oci_auth, settings.oci_config_file, settings.oci_profile,
                                      settings.oci_federation_endpoint)
        options = {"signer": signer, "retry_strategy": oci.retry.DEFAULT_RETRY_STRATEGY, "timeout": (5, 20)}
        if settings.oci_secrets_endpoint:
            options["service_endpoint"] = settings.oci_secrets_endpoint
        bundle = oci.secrets.SecretsClient(config, **options).get_secret_bundle(secret_id).data
        value = base64.b64decode(bundle.secret_bundle_content.content).decode()
    except Exception as exc:  # noqa: BLE001 - one line naming the secret, never a traceback with its value
        raise RuntimeError(f"cannot read the Vault secret {secret_id}: {type(exc).__name__}: "
                           f"{getattr(exc, 'message', exc)}") from None
    log.info("Read the Vault secret %s (version %s)", secret_id, bundle.version_number)
    return value
