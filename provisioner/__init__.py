"""The provisioner behind `model-deployment.py`: package, register, deploy, call and tear down SD3 Medium on OCI.

`details` builds the `oci` request objects from settings (pure), `operations` sends them, `commands`
strings the two together per CLI command, `settings` reads flags, env vars and `deploy.toml`.
"""
