"""How soon /health answers after `bentoml serve` opens its port, and how fast it answers while loading.

The contract (docs/architecture.md) wants /health to answer within a second from the moment the server
listens. This starts the real server (tiny model) a few times, polls the port until it accepts, then
polls /health every 0.2 s until it is ready, and prints each phase:

    python bench/startup.py [--runs 3]

Results go to bench/results/startup.json with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe_machine, machine_line  # noqa: E402
from serving import BENTOML, SERVICE_DIR, free_port  # noqa: E402


def one_start(workdir: Path) -> dict:
    """Start the server once; the seconds from launch to an open port, to the first answer, to ready."""
    port = free_port()
    env = {**os.environ, "SD3_MODEL": "tiny", "IMAGE_DIR": str(workdir / "images"), "SPOOL_DIR": str(workdir / "spool"),
           "HF_HUB_OFFLINE": "1", "BENTOML_HOME": str(workdir / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    with (workdir / "server.log").open("wb") as log:
        process = subprocess.Popen([str(BENTOML), "serve", ".", "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=SERVICE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    launched = time.monotonic()
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.01)
        port_open = time.monotonic()
        answers = []  # (seconds to answer, status)
        while True:
            asked = time.monotonic()
            response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=60)
            answers.append((time.monotonic() - asked, response.status_code))
            if response.status_code == 200:
                break
            if response.json().get("status") == "failed":
                raise RuntimeError(f"the model failed to load: {response.json()['error']}")
            time.sleep(0.2)
        loading = [seconds for seconds, status in answers[1:] if status == 503]
        return {
            "port_open_s": round(port_open - launched, 3),
            "first_answer_s": round(answers[0][0], 3),
            "while_loading_max_s": round(max(loading), 3) if loading else None,
            "while_loading_median_s": round(statistics.median(loading), 3) if loading else None,
            "ready_after_port_open_s": round(time.monotonic() - port_open, 3),
            "answers": len(answers),
        }
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "startup.json")
    args = parser.parse_args()
    machine = describe_machine()
    print(machine_line(machine))
    runs = []
    for index in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="sd3-startup-") as tmp:
            runs.append(one_start(Path(tmp)))
        print(f"run {index + 1}: " + ", ".join(f"{key} {value}" for key, value in runs[-1].items()))
    summary = {key: statistics.median(run[key] for run in runs)
               for key in ("port_open_s", "first_answer_s", "while_loading_max_s", "ready_after_port_open_s")
               if all(run[key] is not None for run in runs)}
    print("median: " + ", ".join(f"{key} {value}" for key, value in summary.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "runs": runs, "median": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
