"""`make bench`: every benchmark, one JSON line each, appended to bench/results/latest.jsonl."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_augment  # noqa: E402
import bench_cache  # noqa: E402
import bench_clients  # noqa: E402
import bench_engine  # noqa: E402
import bench_epoch  # noqa: E402
import bench_fedmas  # noqa: E402
import bench_fedmas224  # noqa: E402
import bench_flower  # noqa: E402


def main() -> None:
    quick = "--quick" in sys.argv
    rows = []
    for module in (bench_engine, bench_epoch, bench_augment, bench_fedmas, bench_fedmas224, bench_cache, bench_flower, bench_clients):
        rows.extend(module.run(quick=quick))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(out / "latest.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps({**row, "when": stamp, "machine": platform.processor() or platform.machine()}) + "\n")
    print(f"results: {out / 'latest.jsonl'}")


if __name__ == "__main__":
    main()
