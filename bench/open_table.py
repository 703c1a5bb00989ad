"""bench/compare.sh's open-loop tables: per shape and round, one row per rate step with
nats-server and channelmesh side by side, each server's max sustainable rate and the ratio;
with several rounds, then each round's maximums and ratio and the median ratio.

    python3 bench/open_table.py WORK_DIR SHAPE...

reads WORK_DIR/{nats,channelmesh}-SHAPE.rROUND.json (the load generator's --json reports)."""

import json
import os
import re
import statistics
import sys

LABELS = {
    "per-channel": "(a) one publisher connection per channel",
    "firehose": "(b) one firehose connection for every channel",
    "admin": "(c) the admin API's PublishStream from one process",
    "chat": "chat: many small channels, a publisher in each",
}
HEADS = ["delivered/s", "lost", "p50", "p99", "p99.9", "max", "srv", "lg", "bound"]
WIDTHS = [12, 9, 7, 7, 8, 8, 5, 5, 5]


def load(work, server, shape, round_):
    path = os.path.join(work, f"{server}-{shape}.r{round_}.json")
    return json.load(open(path)) if os.path.exists(path) else None


def rounds(work, shape):
    """The rounds that left a report of `shape`, in order."""
    found = set()
    pattern = re.compile(rf"^(?:nats|channelmesh)-{re.escape(shape)}\.r(\d+)\.json$")
    for name in os.listdir(work):
        m = pattern.match(name)
        if m:
            found.add(int(m.group(1)))
    return sorted(found)


def ms(us):
    return f"{us / 1000:.1f}"


def cells(step):
    if step is None:
        return ["-"] * len(HEADS)
    bound = "BOUND" if step["loadgen_bound"] else ("" if step["kept_pace"] else "slow")
    cpu = step.get("server_cpu_cores")
    return [
        f"{step['delivered_per_s']:,.0f}",
        f"{step['lost']:,}",
        ms(step["p50_us"]),
        ms(step["p99_us"]),
        ms(step["p999_us"]),
        ms(step["max_us"]),
        "-" if cpu is None else f"{cpu:.2f}",
        f"{step['loadgen_cpu_cores']:.2f}",
        bound,
    ]


def fmt(values):
    return " ".join(f"{v:>{w}}" for v, w in zip(values, WIDTHS))


def main(work, shapes):
    summary = {}
    for shape in shapes:
        numbers = rounds(work, shape)
        if not numbers:
            print()
            print(f"== {shape}: no run succeeded")
            continue
        maxima = []
        for number in numbers:
            nats, cm = load(work, "nats", shape, number), load(work, "channelmesh", shape, number)
            label = f", round {number} of {len(numbers)}" if len(numbers) > 1 else ""
            maxima.append((number, table(shape, label, nats, cm)))
            summary.setdefault(shape, []).append({"nats": nats, "channelmesh": cm})
        if len(numbers) > 1:
            over_rounds(shape, maxima)
    print()
    print("json:", json.dumps(summary))


def over_rounds(shape, maxima):
    """Each round's max sustainable published/s of both servers, its ratio, and the median."""
    print()
    print(f"== {shape}: max sustainable published/s over {len(maxima)} alternating rounds")
    print(f"{'round':>8} {'nats-server':>12} {'channelmesh':>12} {'ratio':>6}")
    ratios = []
    for number, best in maxima:
        n, c = best.get("nats-server"), best.get("channelmesh")
        ratio = "-"
        if n:
            # A round channelmesh sustained no step of counts as 0, not as no round.
            ratios.append(c[1] / n[1] if c else 0.0)
            ratio = f"{ratios[-1]:.2f}"
        cells = [f"{v[0]:,}" if v else "none" for v in (n, c)]
        if shape == "admin":
            cells[0] = "-"
        print(f"{number:>8} {cells[0]:>12} {cells[1]:>12} {ratio:>6}")
    if ratios:
        print(
            f"   channelmesh / nats-server, max sustainable delivered/s: median "
            f"{statistics.median(ratios):.2f} over {len(ratios)} rounds "
            f"(from {min(ratios):.2f} to {max(ratios):.2f})"
        )


def table(shape, label, nats, cm):
    """Prints one round's table of `shape`; returns each server's max sustainable (published/s,
    delivered/s), None where it sustained no step."""
    first = cm or nats
    print()
    if first is None:
        print(f"== {shape}{label}: no run succeeded")
        return {}
    print(
        f"== {shape}{label}: {LABELS.get(shape, shape)}; open loop; {first['clients']} clients, "
        f"{first['channels']} channels (mean {first['fanout']:.1f} members), "
        f"{first['payload_bytes']} B"
    )
    if shape == "admin":
        print("   channelmesh only: nats-server has no admin API")
    print(
        "   rate = published/s offered; latency ms publish -> receive; srv / lg = server /"
        " load generator CPU cores;\n   bound: BOUND = load generator over 85% (the step does"
        " not count), slow = publishers under 95% of the rate"
    )
    width = len(fmt(HEADS))
    print(f"{'':>8}   {'nats-server':^{width}} | {'channelmesh':^{width}}")
    print(f"{'rate/s':>8}   {fmt(HEADS)} | {fmt(HEADS)}")
    steps = {}
    for name, report in (("nats", nats), ("channelmesh", cm)):
        for s in (report or {}).get("steps", []):
            steps.setdefault(s["rate"], {})[name] = s
    for rate in sorted(steps):
        row = steps[rate]
        print(
            f"{rate:>8,}   {fmt(cells(row.get('nats')))} | {fmt(cells(row.get('channelmesh')))}"
        )
    best = {}
    for name, report in (("nats-server", nats), ("channelmesh", cm)):
        if report is None:
            if not (name == "nats-server" and shape == "admin"):
                print(f"   {name}: the run failed")
            continue
        rate = report.get("max_sustainable_rate")
        delivered = report.get("max_sustainable_delivered_per_s")
        best[name] = (rate, delivered) if rate else None
        print(
            f"   {name} max sustainable: "
            + (
                f"{rate:,} published/s, {delivered:,.0f} delivered/s"
                if rate
                else "none of the steps"
            )
        )
    n, c = best.get("nats-server"), best.get("channelmesh")
    if n and c:
        print(f"   channelmesh / nats-server, max sustainable delivered/s: {c[1] / n[1]:.2f}")
    elif shape != "admin":
        print("   channelmesh / nats-server: - (a server sustained none of the steps)")
    return best


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
