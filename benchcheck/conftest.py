"""The benchmarks' own checks (`bash dev.sh bench`, which CI runs after the tests): each script of bench/ runs in
its small configuration and reports what it should. They check what the scripts report, never how fast."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_runner
