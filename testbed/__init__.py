"""What the tests and the benchmarks run the service with: the one `bentoml serve` launcher (`server.py`) and the
OCI-compatible services on loopback (`fakes/`). Not part of the service: nothing in `sd3-medium/` imports it."""
