"""Record a benchmark run into the results store and regenerate BENCHMARKS.md from it, so that the page's numbers
only ever come from a harness's own rows.

    python bench/record.py OUT.jsonl --name NAME [--commit SHA] [--replace]

OUT.jsonl is what a harness wrote beside its markdown report (bench_train.py, bench_law.py,
bench_host_overhead.py, bench_cpu_adam.py, bench_lora_kernel.py, bench_estimate.py, bench_dpo.py, bench_serve.py,
profile_decode.py, bench_multigpu.py):
a header line with the run's meta (device, date, command), then one row a line. It becomes bench/results/NAME.jsonl, its header given the run's name, the next
sequence number and the commit it ran (default: this checkout's HEAD); then bench/report.py renders the page.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report  # noqa: E402
from bench.cases import case_of  # noqa: E402


def record(jsonl: Path, name: str, commit: str | None, results: Path = report.RESULTS, replace: bool = False) -> Path:
    lines = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    head, rows = lines[0], lines[1:]
    if "bench" not in head or "meta" not in head:
        raise SystemExit(f"{jsonl}: its first line is not a harness header with 'bench' and 'meta'")
    if head["meta"].get("tiny"):
        raise SystemExit(f"{jsonl}: a --tiny smoke test measures nothing; it is not recorded")
    if head["bench"] == "train":  # rows carry their case's fields (older files: the table's case of their id)
        for row in rows:
            c = case_of(row)
            row.update(id=c.id, config=c.shape, case=c.to_dict())
    target = results / f"{name}.jsonl"
    if target.exists() and not replace:
        raise SystemExit(f"{target} exists: pick another --name, or --replace it")
    others = [json.loads(p.read_text().splitlines()[0]) for p in results.glob("*.jsonl") if p != target]
    head = {"run": name, "bench": head["bench"], "sequence": 1 + max((h["sequence"] for h in others), default=0),
            "commit": commit, **{k: v for k, v in head.items() if k not in ("run", "bench", "sequence", "commit")}}
    results.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in [head, *rows]))
    return target


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl", type=Path, help="the run's rows, as its harness wrote them")
    p.add_argument("--name", required=True, help="the run's file name in the store (the page names runs by their date)")
    p.add_argument("--commit", help="the commit the run measured (default: this checkout's HEAD)")
    p.add_argument("--replace", action="store_true", help="overwrite a recorded run of the same name")
    p.add_argument("--results", type=Path, default=report.RESULTS)
    p.add_argument("--out", type=Path, default=report.BENCHMARKS, help="the page to regenerate")
    a = p.parse_args(argv)
    commit = a.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=report.ROOT, check=True).stdout.strip()
    print(f"recorded {record(a.jsonl, a.name, commit, a.results, a.replace)}")
    report.main(["--results", str(a.results), "--out", str(a.out)])


if __name__ == "__main__":
    main()
