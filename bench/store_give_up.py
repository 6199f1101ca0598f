"""How soon the Object Storage store gives up when the bucket keeps failing, against its time budget.

    python bench/store_give_up.py [--budget 4]

The real store (the `oci` SDK, resource-principal signing) puts one image into the loopback Object
Storage fake (testbed/fakes) while it answers 503, drops every connection, or answers too slowly, and
prints how long each `put` took to raise, and its attempts. The SDK's default retry strategy would keep
going for minutes; the store's own strategy is bounded by `timeout_seconds` (STORE_TIMEOUT_SECONDS).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "sd3-medium"), str(HERE.parent)]
from machine import describe_machine, machine_line  # noqa: E402

from sd3_service.storage.object_storage import ObjectStorageStore  # noqa: E402
from sd3_service.storage.store import ImageObject, StoreError  # noqa: E402
from testbed.fakes import oci_common  # noqa: E402
from testbed.fakes.object_storage import FakeObjectStorage  # noqa: E402
from testbed.fakes.oci_common import Fault  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=4.0)
    args = parser.parse_args(argv)
    image = ImageObject(name="sd3/2026/11/25/give-up-0.png", data=b"\x89PNG" + os.urandom(4096),
                        content_type="image/png")
    with tempfile.TemporaryDirectory() as scratch, FakeObjectStorage(namespace="ns", buckets=("images",)) as fake:
        os.environ.update(fake.trust(oci_common.resource_principal(Path(scratch) / "rp")).env)
        for outage in ("503", "dropped", "slow"):
            fake.restore()
            fake.requests.clear()
            if outage == "503":
                fake.outage(503)
            elif outage == "dropped":
                fake.outage(None)
            else:
                fake.inject(Fault("delay", count=None, seconds=args.budget + 2))
            store = ObjectStorageStore(bucket="images", namespace="ns", endpoint=fake.endpoint,
                                       timeout_seconds=args.budget)
            began = time.monotonic()
            try:
                store.put(image)
                outcome = "stored (unexpected)"
            except StoreError:
                outcome = "StoreError"
            took = time.monotonic() - began
            print(f"{outage:>8}: {outcome} after {took:.2f} s ({took / args.budget:.2f} x the {args.budget:g} s "
                  f"budget), {len(fake.seen('PUT'))} attempts")
    print(machine_line(describe_machine()))


if __name__ == "__main__":
    main()
