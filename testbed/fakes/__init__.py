"""OCI-compatible HTTP services that tests run on loopback, for the real `oci` SDK to talk to."""
