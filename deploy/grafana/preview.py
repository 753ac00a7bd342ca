#!/usr/bin/env python3
"""Renders the dashboard's main series to a PNG from a live segstream, for
people without a Grafana at hand (and for the README's picture).

It produces a generated sample to a Kafka broker in timed chunks (so that
event time, lag and segment sizes move), scrapes segstream's /metrics once
a second, and plots the same series the dashboard shows: events per
second, consumer lag, event-time lag, commit latency, RFM segment sizes and
the flows into at_risk and champions.

    segstream generate --output events.jsonl --customers 2000 --days 120
    segstream run --config kafka.toml &        # metrics_addr = "127.0.0.1:9464"
    python3 deploy/grafana/preview.py --brokers 127.0.0.1:9092 \\
        --topic segstream.events --events events.jsonl \\
        --metrics http://127.0.0.1:9464/metrics --out docs/dashboard-preview.png

Needs `confluent-kafka` and `matplotlib` (pip).
"""

import argparse
import json
import re
import time
import urllib.request
from collections import defaultdict

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? (\S+)$')


def scrape(url):
    """Every sample of the exposition: {(name, frozenset(labels)): value}."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def total(s, name, **match):
    return sum(v for (n, l), v in s.items() if n == name and all((k, w) in l for k, w in match.items()))


def by(s, name, label, **match):
    out = defaultdict(float)
    for (n, l), v in s.items():
        if n == name and all((k, w) in l for k, w in match.items()):
            out[dict(l).get(label, "")] += v
    return out


def quantile(s, prev, name, q):
    """histogram_quantile over the increase between two scrapes."""
    buckets = sorted(
        (float(dict(l)["le"]), v - prev.get((n, l), 0.0))
        for (n, l), v in s.items() if n == name + "_bucket"
    )
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    for le, c in buckets:
        if c >= rank:
            return le
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=int, default=90)
    args = ap.parse_args()

    from confluent_kafka import Producer
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = open(args.events, "rb").read().splitlines()
    producer = Producer({"bootstrap.servers": args.brokers, "linger.ms": 20, "partitioner": "murmur2_random"})
    chunk = len(lines) // (args.seconds * 2 // 3) + 1
    at, series, prev = 0, [], None
    started = time.time()
    for second in range(args.seconds):
        for raw in lines[at:at + chunk]:
            try:
                key = json.loads(raw).get("customer_id")
            except ValueError:
                key = None
            while True:
                try:
                    producer.produce(args.topic, raw, key=key)
                    break
                except BufferError:
                    producer.poll(0.05)
        at += chunk
        producer.poll(0)
        time.sleep(max(0.0, started + second + 1 - time.time()))
        s = scrape(args.metrics)
        if prev is not None:
            series.append({
                "t": second,
                "events": total(s, "segstream_input_events_total") - total(prev, "segstream_input_events_total"),
                "lag": total(s, "segstream_consumer_lag_records"),
                "event_lag_days": max(by(s, "segstream_event_time_lag_seconds", "partition").values(), default=0) / 86400,
                "p99": quantile(s, prev, "segstream_commit_duration_seconds", 0.99),
                "rfm": by(s, "segstream_segment_customers", "segment", group="rfm"),
                "into": {to: by(s, "segstream_output_transitions_total", "to", group="rfm").get(to, 0)
                         - by(prev, "segstream_output_transitions_total", "to", group="rfm").get(to, 0)
                         for to in ("at_risk", "champions")},
            })
        prev = s
    producer.flush(30)

    t = [p["t"] for p in series]
    fig, ax = plt.subplots(3, 2, figsize=(14, 11))
    fig.suptitle("segstream (series of deploy/grafana/dashboards/segstream.json, from a live /metrics)")
    ax[0][0].plot(t, [p["events"] for p in series]); ax[0][0].set_title("Events per second")
    ax[0][1].plot(t, [p["lag"] for p in series]); ax[0][1].set_title("Consumer lag (records)")
    ax[1][0].plot(t, [p["event_lag_days"] for p in series]); ax[1][0].set_title("Event-time lag (days; a replay of old events)")
    ax[1][1].plot(t, [(p["p99"] or 0) * 1000 for p in series]); ax[1][1].set_title("Commit latency p99 (ms)")
    segments = sorted({k for p in series for k in p["rfm"]})
    ax[2][0].stackplot(t, *[[p["rfm"].get(k, 0) for p in series] for k in segments], labels=segments)
    ax[2][0].set_title("RFM segment sizes"); ax[2][0].legend(loc="upper left", fontsize=7, ncol=2)
    for to in ("at_risk", "champions"):
        ax[2][1].plot(t, [p["into"][to] for p in series], label="into " + to)
    ax[2][1].set_title("Flows into at_risk and champions (per second)"); ax[2][1].legend()
    for row in ax:
        for a in row:
            a.set_xlabel("seconds"); a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out} ({len(series)} scrapes)")


if __name__ == "__main__":
    main()
