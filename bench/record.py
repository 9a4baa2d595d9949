"""Put a benchmark's markdown output into BENCHMARKS.md, so that its numbers only ever come from the harness.

    python bench/record.py lora_kernel.md [--name lora_kernel]

replaces what lies between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` (NAME defaults to the file's stem),
appending the section if BENCHMARKS.md has none yet, and creating BENCHMARKS.md if absent.
"""
from __future__ import annotations

import argparse
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def record(content: str, name: str, target: Path = BENCHMARKS) -> None:
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n{content.strip()}\n{end}"
    text = target.read_text() if target.exists() else "# Benchmarks\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    target.write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, help="the benchmark's markdown output")
    parser.add_argument("--name", help="section name (default: the file's stem)")
    parser.add_argument("--target", type=Path, default=BENCHMARKS)
    args = parser.parse_args()
    record(args.file.read_text(), args.name or args.file.stem, args.target)


if __name__ == "__main__":
    main()
