"""What the benchmarks ran on: CPU, cores, load, library versions (written into every result file)."""

from __future__ import annotations

import os
import platform
from importlib import metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(packages=("torch", "diffusers", "transformers", "bentoml", "pillow", "numpy")) -> dict:
    """CPU model, core count, load average and package versions, for a result file's header."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_1_5_15": load_average(),
        "packages": {name: version(name) for name in packages},
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["gpu_multiprocessors"] = props.multi_processor_count
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return f"{info['cpu']}, {info['cores']} cores{gpu}, load {info['load_average_1_5_15']}; {packages}"


def save_report(report: dict, path) -> None:
    """Print the machine a report was measured on, then write the report as JSON to `path`."""
    import json
    from pathlib import Path

    print(machine_line(report["machine"]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")


def median_ms(samples: list[float]) -> float:
    """The median of `samples` (seconds), in milliseconds."""
    import statistics

    return round(statistics.median(samples) * 1000, 2)


def smoke_or_full(description: str, plans: dict, name: str, argv=None):
    """The command line of a benchmark with a full and a `--smoke` plan: (its plan, where its report goes)."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small and few: checks the script works")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = Path(__file__).resolve().parent / "results"
    return plans["smoke" if args.smoke else "full"], args.out or results / f"{name}{'-smoke' if args.smoke else ''}.json"
