"""Turning runs into results: medians, ratios, the target checks, the table, JSON and the chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from workloads import WORKLOADS, Run

TARGETS = ("direct", "pgbouncer", "sidecar")
MIB = 1024  # KiB per MiB

# From the issue: sidecar/PgBouncer tps floors, per workload, at 50 and 500 clients.
TPS_FLOORS = {"simple": 1.0, "extended": 1.0, "tpcb": 0.95}
TPS_FLOOR_CLIENTS = (50, 500)
ADDED_LATENCY_FACTOR = 1.5
IDLE_RSS_LIMIT_MIB = 64
STORM_LIMIT_S = 3.0
#: Foreign CPU load (percent of the machine) above which a figure is flagged as disturbed.
DISTURBED_PCT = 10.0


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(runs: list[Run]) -> dict[str, Any]:
    """Median figures over the successful runs of one target in one cell."""
    ok = [r for r in runs if r.error is None and r.tps is not None]
    cpu = [
        r.pooler_cpu_s / r.transactions * 10_000
        for r in ok
        if r.pooler_cpu_s is not None and r.transactions
    ]
    return {
        "median_tps": _median([r.tps for r in ok if r.tps is not None]),
        "avg_ms": _median([r.avg_ms for r in ok if r.avg_ms is not None]),
        "p99_ms": _median([r.p99_ms for r in ok if r.p99_ms is not None]),
        "cpu_s_per_10k_tx": _median(cpu),
        "runs_ok": len(ok),
        "runs": len(runs),
        "max_foreign_cpu_pct": max(
            (r.foreign_cpu_pct for r in runs if r.foreign_cpu_pct is not None), default=None
        ),
        "error": next((r.error for r in runs if r.error), None),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def cell_result(workload: str, clients: int, runs: dict[str, list[Run]]) -> dict[str, Any]:
    names = [*TARGETS, *(t for t in runs if t not in TARGETS)]  # + "baseline" (--baseline)
    summary = {t: summarise(runs.get(t, [])) for t in names}
    sc, pgb, direct = (summary[t]["median_tps"] for t in ("sidecar", "pgbouncer", "direct"))
    cell = {
        "workload": workload,
        "label": WORKLOADS[workload][0],
        "clients": clients,
        "targets": summary,
        "sidecar_over_pgbouncer": _ratio(sc, pgb),
        "sidecar_over_direct": _ratio(sc, direct),
        "runs": {t: [r.as_dict() for r in rs] for t, rs in runs.items()},
    }
    if "baseline" in summary:
        cell["sidecar_over_baseline"] = _ratio(sc, summary["baseline"]["median_tps"])
    return cell


def find_cell(cells: list[dict[str, Any]], workload: str, clients: int) -> dict[str, Any] | None:
    return next((c for c in cells if c["workload"] == workload and c["clients"] == clients), None)


def check_targets(cells: list[dict[str, Any]], extras: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue that this run measured: value, limit, pass/fail."""
    checks: list[dict[str, Any]] = []
    for workload, floor in TPS_FLOORS.items():
        for clients in TPS_FLOOR_CLIENTS:
            cell = find_cell(cells, workload, clients)
            if cell is None:
                continue
            ratio = cell["sidecar_over_pgbouncer"]
            checks.append(
                {
                    "name": f"sidecar/pgbouncer tps, {WORKLOADS[workload][0]}, {clients} clients",
                    "value": ratio,
                    "limit": f">= {floor:.2f}",
                    "pass": None if ratio is None else ratio >= floor,
                }
            )
    for workload in WORKLOADS:
        cell = find_cell(cells, workload, 1)
        if cell is None:
            continue
        t = cell["targets"]
        direct, pgb, sc = (t[x]["avg_ms"] for x in ("direct", "pgbouncer", "sidecar"))
        name = f"1-client added latency, {WORKLOADS[workload][0]} (sidecar vs 1.5 x pgbouncer)"
        if None in (direct, pgb, sc):
            checks.append({"name": name, "value": None, "limit": "n/a", "pass": None})
            continue
        added_sc, added_pgb = sc - direct, pgb - direct
        limit = ADDED_LATENCY_FACTOR * added_pgb
        checks.append(
            {
                "name": name,
                "value": round(added_sc, 4),
                "limit": f"<= {limit:.4f} ms (pgbouncer adds {added_pgb:.4f} ms)",
                "pass": added_sc <= limit,
            }
        )
    idle = extras.get("idle", {}).get("sidecar")
    if idle:
        rss = idle.get("rss_mib")
        ok = rss is not None and rss <= IDLE_RSS_LIMIT_MIB and idle["clients_ok"] == idle["wanted"]
        checks.append(
            {
                "name": f"sidecar RSS with {idle['wanted']:,} idle clients",
                "value": rss,
                "limit": f"<= {IDLE_RSS_LIMIT_MIB} MiB, all logged in",
                "pass": ok,
            }
        )
    storm = extras.get("storm", {}).get("sidecar")
    if storm:
        ok = storm["median_s"] <= STORM_LIMIT_S and storm["errors"] == 0
        checks.append(
            {
                "name": f"{storm['clients']:,}-client storm through the sidecar (median wall time)",
                "value": storm["median_s"],
                "limit": f"<= {STORM_LIMIT_S:.0f} s, 0 errors (had {storm['errors']})",
                "pass": ok,
            }
        )
    return checks


# --- text --------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _ms(value: float) -> str:
    # Three significant-ish figures keep 0.035 and 1544.7 in the same column width.
    return f"{value:.3f}" if value < 10 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def _lat(summary: dict[str, Any]) -> str:
    if summary["avg_ms"] is None:
        return "n/a"
    return f"{_ms(summary['avg_ms'])}/{_ms(summary['p99_ms'])}"


def table(cells: list[dict[str, Any]]) -> str:
    head = (
        f"{'workload':<12} {'clients':>7} {'direct':>10} {'pgbouncer':>10} {'sidecar':>10}"
        f" {'sc/pgb':>7} {'sc/dir':>7}   {'direct':>15} {'pgbouncer':>15} {'sidecar':>15}"
    )
    lines = [
        f"{'':<12} {'':>7} {'median tps':^32} {'ratios':^15}   "
        f"{'latency avg/p99 ms (median of rounds)':^47}",
        head,
        "-" * len(head),
    ]
    for c in cells:
        t = c["targets"]
        lines.append(
            f"{c['label']:<12} {c['clients']:>7} {_num(t['direct']['median_tps']):>10}"
            f" {_num(t['pgbouncer']['median_tps']):>10} {_num(t['sidecar']['median_tps']):>10}"
            f" {_num(c['sidecar_over_pgbouncer'], '.2f'):>7}"
            f" {_num(c['sidecar_over_direct'], '.2f'):>7}"
            f"   {_lat(t['direct']):>15} {_lat(t['pgbouncer']):>15} {_lat(t['sidecar']):>15}"
        )
    notes = []
    for c in cells:
        for name, t in c["targets"].items():
            if t["error"]:
                what = (
                    "n/a"
                    if not t["runs_ok"]
                    else f"{t['runs'] - t['runs_ok']}/{t['runs']} runs failed"
                )
                notes.append(
                    f"  {c['label']}, {c['clients']} clients, {name}: {what}: {t['error']}"
                )
        foreign = max((t["max_foreign_cpu_pct"] or 0 for t in c["targets"].values()), default=0)
        if foreign > DISTURBED_PCT:
            notes.append(
                f"  {c['label']}, {c['clients']} clients: disturbed, other processes used up to"
                f" {foreign:.0f}% of the CPUs during a run"
            )
    return "\n".join(lines + notes)


def baseline_text(cells: list[dict[str, Any]], ref: str) -> str:
    """This sidecar against the baseline commit's, cell by cell (same rounds, interleaved)."""
    lines = [
        f"sidecar vs baseline ({ref}), median of rounds:",
        f"{'workload':<12} {'clients':>7} {'sidecar':>10} {'baseline':>10} {'ratio':>7}"
        f"   {'CPU s/10k tx':>12} {'baseline':>10} {'ratio':>7}",
    ]
    for c in cells:
        t = c["targets"]
        sc_cpu, base_cpu = t["sidecar"]["cpu_s_per_10k_tx"], t["baseline"]["cpu_s_per_10k_tx"]
        lines.append(
            f"{c['label']:<12} {c['clients']:>7} {_num(t['sidecar']['median_tps']):>10}"
            f" {_num(t['baseline']['median_tps']):>10}"
            f" {_num(c.get('sidecar_over_baseline'), '.2f'):>7}"
            f"   {_num(sc_cpu, '.3f'):>12} {_num(base_cpu, '.3f'):>10}"
            f" {_num(_ratio(sc_cpu, base_cpu), '.2f'):>7}"
        )
    return "\n".join(lines)


def client_tls_text(cells: list[dict[str, Any]]) -> str:
    """Each pooler with clients in clear and over TLS (--client-tls), same rounds: tps and
    the pooler's CPU per 10,000 transactions, and the sidecar against PgBouncer over TLS."""
    lines = [
        "client TLS (sslmode=require between pgbench and the pooler), median of rounds:",
        f"{'workload':<12} {'clients':>7} {'pooler':<10} {'clear tps':>10} {'tls tps':>10}"
        f" {'ratio':>6}   {'CPU s/10k tx clear':>18} {'tls':>7} {'ratio':>6}",
    ]
    for c in cells:
        t = c["targets"]
        for pooler in ("pgbouncer", "sidecar"):
            clear, tls = t[pooler], t.get(f"{pooler}+tls")
            if tls is None:
                continue
            lines.append(
                f"{c['label']:<12} {c['clients']:>7} {pooler:<10}"
                f" {_num(clear['median_tps']):>10} {_num(tls['median_tps']):>10}"
                f" {_num(_ratio(tls['median_tps'], clear['median_tps']), '.2f'):>6}"
                f"   {_num(clear['cpu_s_per_10k_tx'], '.3f'):>18}"
                f" {_num(tls['cpu_s_per_10k_tx'], '.3f'):>7}"
                f" {_num(_ratio(tls['cpu_s_per_10k_tx'], clear['cpu_s_per_10k_tx']), '.2f'):>6}"
            )
        sc, pgb = t.get("sidecar+tls"), t.get("pgbouncer+tls")
        if sc is not None and pgb is not None:
            lines.append(
                f"{'':<12} {'':>7} {'sc/pgb tls':<10} {'':>10}"
                f" {_num(_ratio(sc['median_tps'], pgb['median_tps']), '.2f'):>10}"
            )
    return "\n".join(lines)


def extras_text(extras: dict[str, Any]) -> str:
    lines: list[str] = []
    for name, idle in extras.get("idle", {}).items():
        lines.append(
            f"idle clients  {name:<10} {idle['clients_ok']:>6,}/{idle['wanted']:,} logged in"
            f" in {idle['open_s']:.1f} s; RSS {_num(idle['rss_mib'], '.1f')} MiB"
            f" (before {_num(idle['rss_before_mib'], '.1f')} MiB,"
            f" {_num(idle['kib_per_client'], '.2f')} KiB/client, peak"
            f" {_num(idle['hwm_mib'], '.1f')} MiB); errors {idle['errors']}"
            + _disturbed(idle["foreign_cpu_pct"])
        )
    for name, storm in extras.get("storm", {}).items():
        rounds = ", ".join(f"{s:.2f}" for s in storm["rounds_s"])
        lines.append(
            f"storm         {name:<10} {storm['clients']:,} clients connect+SCRAM+select 1:"
            f" median {storm['median_s']:.2f} s (rounds: {rounds}); errors {storm['errors']}"
            + (f" {storm['error_kinds']}" if storm["errors"] else "")
            + _disturbed(max(storm["foreign_cpu_pct"]))
        )
    for name, cpu in extras.get("cpu", {}).items():
        lines.append(
            f"cpu           {name:<10} {_num(cpu, '.3f')} CPU s per 10,000 transactions"
            " (-S simple, 50 clients, median of rounds)"
        )
    for name, split in extras.get("cpu_split", {}).items():
        what = " (bench/floor.py: 1:1 uvloop forwarder, no parsing, no pooling)"
        lines.append(
            f"cpu split     {name:<10} user {split['user_s']:.3f} s + system"
            f" {split['system_s']:.3f} s per 10,000 transactions"
            + (what if name == "floor" else "")
            + _disturbed(max(split["foreign_cpu_pct"]))
        )
    return "\n".join(lines)


def _disturbed(pct: float) -> str:
    return f"  [disturbed: other load {pct:.0f}%]" if pct > DISTURBED_PCT else ""


def foreign_text(cells: list[dict[str, Any]]) -> str:
    """One line on how much other processes used the machine during the pgbench runs."""
    values = sorted(
        r["foreign_cpu_pct"]
        for c in cells
        for runs in c["runs"].values()
        for r in runs
        if r["foreign_cpu_pct"] is not None
    )
    if not values:
        return ""
    verdict = (
        "quiet enough"
        if values[-1] <= DISTURBED_PCT
        else f"runs above {DISTURBED_PCT:.0f}% are disturbed: rerun on a quiet machine"
    )
    return (
        f"Other processes used a median {statistics.median(values):.1f}% (max {values[-1]:.0f}%)"
        f" of the CPUs during the pgbench runs: {verdict}."
    )


def targets_text(checks: list[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[c["pass"]]
        value = c["value"]
        shown = "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else value
        lines.append(f"  {verdict}  {c['name']}: {shown} ({c['limit']})")
    return "\n".join(lines)


# --- files -------------------------------------------------------------------------------------


def write_json(results: dict[str, Any], out_dir: Path, stamp: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    paths = [out_dir / f"{stamp}.json", out_dir / "latest.json"]
    for path in paths:
        path.write_text(text)
    return paths


def render_chart(cells: list[dict[str, Any]], meta: dict[str, Any], paths: list[Path]) -> None:
    """Grouped bars of median tps: one panel per workload, clients on x, one bar per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in WORKLOADS if any(c["workload"] == w for c in cells)]
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 4.6), squeeze=False)
    colors = {"direct": "#9e9e9e", "pgbouncer": "#4c72b0", "sidecar": "#dd8452"}
    width = 0.27
    for ax, workload in zip(axes[0], workloads, strict=True):
        mine = [c for c in cells if c["workload"] == workload]
        top = max((c["targets"][t]["median_tps"] or 0 for c in mine for t in TARGETS), default=0)
        for i, cell in enumerate(mine):
            for j, target in enumerate(TARGETS):
                tps = cell["targets"][target]["median_tps"]
                x = i + (j - 1) * width
                if tps is None:
                    ax.text(x, top * 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                    continue
                ax.bar(x, tps, width, color=colors[target], label=target if i == 0 else None)
            ratio = cell["sidecar_over_pgbouncer"]
            sc = cell["targets"]["sidecar"]["median_tps"]
            if ratio is not None and sc is not None:
                ax.text(i + width, sc, f"{ratio:.2f}x", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(mine)), [f"{c['clients']} cl" for c in mine])
        ax.set_title(WORKLOADS[workload][0])
        ax.set_ylabel("median tps")
        ax.set_ylim(0, top * 1.15 or 1)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=3, fontsize=8)
    fig.suptitle(
        f"pgbench median tps, pool {meta['pool_size']}, {meta['seconds']} s x "
        f"{meta['rounds']} rounds, {meta['cpus']} CPUs shared by all processes"
        " (label: sidecar/pgbouncer)",
        fontsize=9,
        x=0.01,
        ha="left",
    )
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)
