#!/usr/bin/env python3
"""Parses a Prometheus text exposition (version 0.0.4) with the Prometheus project's own
parser (prometheus_client.parser) and prints what it found as one JSON document:

    {"families": [{"name", "type", "help", "samples": [{"name", "labels", "value"}]}]}

Values that JSON cannot hold (NaN, +Inf, -Inf) are printed as strings. Reads the file named
on the command line, or standard input. Exits 1 with the parser's message on stderr when the
text does not parse, or breaks a rule of the format the parser lets through: a family declared
twice, a sample of no declared family (type "unknown": every zapvm metric has a type), a
histogram whose buckets are not cumulative or whose +Inf bucket differs from its count.
"""
import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def value(v):
    return v if math.isfinite(v) else str(v)


def main():
    text = open(sys.argv[1]).read() if len(sys.argv) > 1 else sys.stdin.read()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    dupes = sorted({t for t in types if types.count(t) > 1})
    if dupes:
        print(f"parse_metrics: families declared more than once: {dupes}", file=sys.stderr)
        return 1
    try:
        families = [
            {
                "name": f.name,
                "type": f.type,
                "help": f.documentation,
                "samples": [{"name": s.name, "labels": s.labels, "value": value(s.value)} for s in f.samples],
            }
            for f in text_string_to_metric_families(text)
        ]
    except Exception as e:  # the parser raises ValueError and others on malformed input
        print(f"parse_metrics: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    problems = [f"{f['name']} has no # TYPE" for f in families if f["type"] == "unknown"]
    for f in (f for f in families if f["type"] == "histogram"):
        series = {}
        for smp in f["samples"]:
            key = tuple(sorted((k, v) for k, v in smp["labels"].items() if k != "le"))
            series.setdefault(key, {"buckets": [], "count": None})
            if smp["name"].endswith("_bucket"):
                series[key]["buckets"].append((float(smp["labels"]["le"]), smp["value"]))
            elif smp["name"].endswith("_count"):
                series[key]["count"] = smp["value"]
        for key, s in series.items():
            counts = [n for _, n in s["buckets"]]
            bounds = [b for b, _ in s["buckets"]]
            if counts != sorted(counts) or bounds != sorted(bounds):
                problems.append(f"{f['name']}{dict(key)}: buckets are not cumulative in order of le")
            if not bounds or bounds[-1] != math.inf or counts[-1] != s["count"]:
                problems.append(f"{f['name']}{dict(key)}: the +Inf bucket is not the count")
    if problems:
        print("parse_metrics: " + "; ".join(problems), file=sys.stderr)
        return 1
    json.dump({"families": families}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
