"""The per-collection relevance table of docs/relevance.md, from ``braid eval`` summaries.

    for c in cranfield scifact cacm lisa npl med; do
      braid eval ../shared/data/$c --plans bm25,dense,hybrid,rrf,minmax,zscore,dbsf --out eval-results
    done
    python bench/relevance_report.py eval-results

Prints one markdown table per measure (nDCG@10, R@100, RR@10): every plan per collection,
the margin of the default plan (``hybrid``) over the better single strand, and the
published reference figures where the collection is a BEIR one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ir_data import PUBLISHED

from braid.service.evaluate import MEASURES

ORDER = ("cranfield", "scifact", "cacm", "lisa", "npl", "med")


def load(folder: Path) -> dict[str, dict]:
    summaries = {}
    for path in sorted(folder.glob("*.summary.json")):
        summary = json.loads(path.read_text())
        name = Path(summary["directory"]).name
        summaries[name] = summary
    return dict(sorted(summaries.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the --out folder of braid eval")
    args = parser.parse_args()
    summaries = load(Path(args.folder))
    plans = list(dict.fromkeys(p["plan"] for s in summaries.values() for p in s["plans"]))
    for measure in MEASURES:
        head = ["collection", "docs", "queries", *plans]
        main_measure = measure == MEASURES[0]
        if main_measure:
            head += ["hybrid - max(bm25, dense)", "published bm25 / dense"]
        print(f"\n{measure}\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for name, summary in summaries.items():
            value = {p["plan"]: p["metrics"][measure] for p in summary["plans"]}
            cells = [name, str(summary["documents"]), str(summary["queries"])]
            best = max(value.get("bm25", 0.0), value.get("dense", 0.0))
            for plan in plans:
                cell = f"{value[plan]:.4f}" if plan in value else "-"
                cells.append(f"**{cell}**" if plan == "hybrid" else cell)
            if main_measure:
                ref = PUBLISHED.get(name, {})
                cells.append(f"{value['hybrid'] - best:+.4f}" if "hybrid" in value else "-")
                cells.append(f"{ref.get('bm25', '-')} / {ref.get('dense', '-')}")
            print("| " + " | ".join(cells) + " |")
    print("\np50 latency, ms (Search round trip, query encoding included)\n")
    print("| collection | " + " | ".join(plans) + " |")
    print("|" + "---|" * (len(plans) + 1))
    for name, summary in summaries.items():
        latency = {p["plan"]: p["latency_ms"]["p50"] for p in summary["plans"]}
        print(f"| {name} | " + " | ".join(f"{latency[p]:.1f}" if p in latency else "-" for p in plans) + " |")


if __name__ == "__main__":
    main()
