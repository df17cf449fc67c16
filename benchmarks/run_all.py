"""`make bench`: run every benchmark script, keep its JSON, and tabulate all figures and targets.

Writes ``benchmarks/results/<script>.json`` per script and ``benchmarks/results/README.md``.
A script that fails is reported (with its stderr tail) and does not stop the others.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Long studies and the GPU check run on their own.
SKIP = {"common.py", "run_all.py", "quality.py", "generator_nll.py", "gpu_check.py"}


def scripts(selected: list[str]) -> list[Path]:
    found = sorted(p for p in HERE.glob("*.py") if p.name not in SKIP)
    return [p for p in found if not selected or p.stem in selected]


def table(records: dict[str, dict]) -> str:
    lines = ["# Benchmark results", "", "Produced by `make bench` (`python -m benchmarks.run_all`).", ""]
    for name, record in records.items():
        machine = record.get("machine", {})
        lines += [f"## {name}", "", f"Machine: {machine.get('cpu')} ({machine.get('threads')} threads), "
                  f"GPU: {machine.get('gpu') or 'none'}", ""]
        if "error" in record:
            lines += ["```", record["error"], "```", ""]
            continue
        if record.get("note"):
            lines += [f"Note: {record['note']}.", ""]
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _flatten(record.get("figures", {})).items()]
        if record.get("targets"):
            lines += ["", "| target | value | condition | met |", "|---|---|---|---|"]
            lines += [f"| {k} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'NO'} |"
                      for k, t in record["targets"].items()]
        lines.append("")
    return "\n".join(lines)


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmark script names without .py (default: all)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--table-only", action="store_true", help="only rebuild README.md from the JSON files")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = {}
    for script in [] if args.table_only else scripts(args.names):
        start = time.time()
        print(f"[bench] {script.name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{script.stem}"], capture_output=True, text=True,
                              cwd=HERE.parent)
        try:
            record = json.loads(proc.stdout[proc.stdout.index("{"):])
        except ValueError:
            record = {"benchmark": script.stem, "error": f"exit {proc.returncode}\n{proc.stderr[-2000:]}"}
        record["seconds"] = round(time.time() - start, 1)
        (out / f"{script.stem}.json").write_text(json.dumps(record, indent=2) + "\n")
        records[script.stem] = record
        print(f"[bench] {script.name}: {'error' if 'error' in record else 'ok'} in {record['seconds']} s",
              file=sys.stderr, flush=True)
    for existing in sorted(out.glob("*.json")):  # keep results of scripts not re-run this time
        records.setdefault(existing.stem, json.loads(existing.read_text()))
    (out / "README.md").write_text(table(dict(sorted(records.items()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
