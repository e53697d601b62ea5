"""Turning runs into results: medians, ratios, the target checks, the table, JSON and the chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from workloads import WORKLOADS, Run

#: The targets every cell has, then the optional ones, in the order of tables and charts.
TARGETS = ("direct", "pgbouncer", "sidecar")
ORDER = (*TARGETS, "sidecar-pure", "floor")
MIB = 1024  # KiB per MiB

# Issue #14's targets, checked for the compiled sidecar in every pass (clear, tls).
#: sidecar/PgBouncer tps floors, per workload, at 50 and 500 clients.
TPS_FLOORS = {"simple": 0.95, "extended": 0.95, "tpcb": 0.95}
TPS_FLOOR_CLIENTS = (50, 500)
#: sidecar/PgBouncer CPU seconds per 10,000 transactions, -S simple at 50 clients.
CPU_FACTOR = 1.25
#: 1 client: the sidecar's average latency over direct, against PgBouncer's.
ADDED_LATENCY_FACTOR = 1.3
IDLE_RSS_LIMIT_MIB = 64
STORM_LIMIT_S = 3.0
#: From spawning `python -m sidecar` to its port accepting (compiled build, defaults).
STARTUP_LIMIT_MS = 300.0
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
    # + sidecar-pure, floor, baseline (--baseline), pgbouncer+tls, sidecar+tls (--client-tls)
    names = [*TARGETS, *(t for t in runs if t not in TARGETS)]
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
    if "sidecar-pure" in summary:
        cell["pure_over_pgbouncer"] = _ratio(summary["sidecar-pure"]["median_tps"], pgb)
    if "floor" in summary:
        cell["sidecar_over_floor"] = _ratio(sc, summary["floor"]["median_tps"])
    if "baseline" in summary:
        cell["sidecar_over_baseline"] = _ratio(sc, summary["baseline"]["median_tps"])
    return cell


def find_cell(cells: list[dict[str, Any]], workload: str, clients: int) -> dict[str, Any] | None:
    return next((c for c in cells if c["workload"] == workload and c["clients"] == clients), None)


def _tps(t: dict[str, Any], name: str) -> float | None:
    return t[name]["median_tps"] if name in t else None


def added_latency_ms(cell: dict[str, Any]) -> dict[str, float]:
    """Each pooler's (and the floor's) average latency over direct's, in ms."""
    t = cell["targets"]
    direct = t["direct"]["avg_ms"]
    if direct is None:
        return {}
    return {
        name: x["avg_ms"] - direct
        for name, x in t.items()
        if name != "direct" and x["avg_ms"] is not None
    }


def check_targets(passes: list[dict[str, Any]], extras: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue #14 that this run measured: value, limit, pass/fail (None: the
    run could not tell), the throughput ones per pass."""
    checks: list[dict[str, Any]] = []
    for p in passes:
        cells, tag = p["cells"], f"[{p['name']}]"
        cell = find_cell(cells, "simple", 50)
        if cell is not None:
            t = cell["targets"]
            sc, pgb = t["sidecar"]["cpu_s_per_10k_tx"], t["pgbouncer"]["cpu_s_per_10k_tx"]
            ratio = _ratio(sc, pgb)
            checks.append(
                {
                    "name": f"{tag} CPU per 10,000 tx, -S simple, 50 clients, sidecar/pgbouncer",
                    "value": ratio,
                    "limit": f"<= {CPU_FACTOR:.2f} (sidecar {_num(sc, '.3f')} s,"
                    f" pgbouncer {_num(pgb, '.3f')} s)",
                    "pass": None if ratio is None else ratio <= CPU_FACTOR,
                }
            )
        for workload, floor in TPS_FLOORS.items():
            for clients in TPS_FLOOR_CLIENTS:
                cell = find_cell(cells, workload, clients)
                if cell is None:
                    continue
                ratio = cell["sidecar_over_pgbouncer"]
                checks.append(
                    {
                        "name": f"{tag} tps sidecar/pgbouncer, {WORKLOADS[workload][0]},"
                        f" {clients} clients",
                        "value": ratio,
                        "limit": f">= {floor:.2f}",
                        "pass": None if ratio is None else ratio >= floor,
                    }
                )
        for workload in WORKLOADS:
            cell = find_cell(cells, workload, 1)
            if cell is None or workload == "prepared":
                continue  # PgBouncer 1.18 cannot run -S prepared: nothing to compare with
            name = f"{tag} 1-client added latency, {WORKLOADS[workload][0]}, sidecar/pgbouncer"
            added = added_latency_ms(cell)
            if "sidecar" not in added or "pgbouncer" not in added:
                checks.append({"name": name, "value": None, "limit": "n/a", "pass": None})
                continue
            added_sc, added_pgb = added["sidecar"], added["pgbouncer"]
            # PgBouncer faster than direct (TPC-B's commits, a lucky round): noise decides,
            # no verdict.
            ratio = added_sc / added_pgb if added_pgb > 0 else None
            checks.append(
                {
                    "name": name,
                    "value": ratio,
                    "limit": f"<= {ADDED_LATENCY_FACTOR:.1f} (sidecar {added_sc * 1000:+.0f} µs,"
                    f" pgbouncer {added_pgb * 1000:+.0f} µs over direct)",
                    "pass": None if ratio is None else ratio <= ADDED_LATENCY_FACTOR,
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
    startup = extras.get("startup", {}).get("compiled")
    if startup:
        pure = extras["startup"].get("pure", {}).get("median_ms")
        checks.append(
            {
                "name": "sidecar ready after launch (spawn to accepting, compiled, median)",
                "value": startup["median_ms"],
                "limit": f"<= {STARTUP_LIMIT_MS:.0f} ms (pure build: {_num(pure, '.0f')} ms)",
                "pass": startup["median_ms"] <= STARTUP_LIMIT_MS,
            }
        )
    return checks


# --- text --------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _present(cells: list[dict[str, Any]]) -> list[str]:
    """The targets of ORDER that some cell has."""
    return [t for t in ORDER if any(t in c["targets"] for c in cells)]


_SHORT = {"sidecar-pure": "pure"}


def table(cells: list[dict[str, Any]]) -> str:
    """Median tps per target and the ratios, one line per cell."""
    names = _present(cells)
    ratios = [("sc/pgb", "sidecar_over_pgbouncer"), ("sc/dir", "sidecar_over_direct")]
    if "sidecar-pure" in names:
        ratios.append(("pure/pgb", "pure_over_pgbouncer"))
    if "floor" in names:
        ratios.append(("sc/floor", "sidecar_over_floor"))
    head = (
        f"{'workload':<12} {'clients':>7}"
        + "".join(f" {_SHORT.get(n, n):>10}" for n in names)
        + "".join(f" {label:>8}" for label, _ in ratios)
    )
    width = 11 * len(names)
    lines = [
        f"{'':<12} {'':>7} {'median tps':^{width}} {'ratios':^{9 * len(ratios)}}",
        head,
        "-" * len(head),
    ]
    for c in cells:
        t = c["targets"]
        lines.append(
            f"{c['label']:<12} {c['clients']:>7}"
            + "".join(f" {_num(t[n]['median_tps']) if n in t else '-':>10}" for n in names)
            + "".join(f" {_num(c.get(key), '.2f'):>8}" for _, key in ratios)
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
    if "floor" in names:
        notes.append(
            "  floor: bench/floor.py, a 1:1 uvloop forwarder (no parsing, no pooling, the same"
            " TLS leg to PostgreSQL): what any pooler in Python pays; -S workloads only"
        )
    return "\n".join(lines + notes)


def cpu_latency_table(cells: list[dict[str, Any]]) -> str:
    """Per cell: each pooler's CPU seconds per 10,000 transactions (sidecar/PgBouncer), and
    the average latency over direct's (µs; the latency targets read the 1-client lines)."""
    names = [n for n in _present(cells) if n != "direct"]
    head = (
        f"{'workload':<12} {'clients':>7}"
        + "".join(f" {_SHORT.get(n, n):>9}" for n in names)
        + f" {'sc/pgb':>7}  "
        + "".join(f" {_SHORT.get(n, n):>9}" for n in names)
        + f" {'sc/pgb':>7}"
    )
    width = 10 * len(names) + 8
    lines = [
        f"{'':<12} {'':>7} {'CPU s per 10,000 tx':^{width}}  "
        f"{'added avg latency over direct, µs':^{width}}",
        head,
        "-" * len(head),
    ]
    for c in cells:
        t = c["targets"]
        cpu = {n: t[n]["cpu_s_per_10k_tx"] for n in names if n in t}
        added = added_latency_ms(c)
        add_sc, add_pgb = added.get("sidecar"), added.get("pgbouncer")
        lat_ratio = add_sc / add_pgb if add_sc is not None and add_pgb else None
        lines.append(
            f"{c['label']:<12} {c['clients']:>7}"
            + "".join(f" {_num(cpu.get(n), '.3f') if n in t else '-':>9}" for n in names)
            + f" {_num(_ratio(cpu.get('sidecar'), cpu.get('pgbouncer')), '.2f'):>7}  "
            + "".join(
                f" {_num(added[n] * 1000 if n in added else None, ',.0f') if n in t else '-':>9}"
                for n in names
            )
            + f" {_num(lat_ratio, '.2f'):>7}"
        )
    return "\n".join(lines)


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
            f"idle clients  {name:<12} {idle['clients_ok']:>6,}/{idle['wanted']:,} logged in"
            f" in {idle['open_s']:.1f} s; RSS {_num(idle['rss_mib'], '.1f')} MiB"
            f" (before {_num(idle['rss_before_mib'], '.1f')} MiB,"
            f" {_num(idle['kib_per_client'], '.2f')} KiB/client, peak"
            f" {_num(idle['hwm_mib'], '.1f')} MiB); errors {idle['errors']}"
            + _disturbed(idle["foreign_cpu_pct"])
        )
    for name, storm in extras.get("storm", {}).items():
        rounds = ", ".join(f"{s:.2f}" for s in storm["rounds_s"])
        lines.append(
            f"storm         {name:<12} {storm['clients']:,} clients connect+SCRAM+select 1:"
            f" median {storm['median_s']:.2f} s (rounds: {rounds}); errors {storm['errors']}"
            + (f" {storm['error_kinds']}" if storm["errors"] else "")
            + _disturbed(max(storm["foreign_cpu_pct"]))
        )
    for name, cpu in extras.get("cpu", {}).items():
        lines.append(
            f"cpu           {name:<12} {_num(cpu, '.3f')} CPU s per 10,000 transactions"
            " (-S simple, 50 clients, median of rounds)"
        )
    startup = extras.get("startup", {})
    for name, figure in startup.items():
        if isinstance(figure, dict) and "median_ms" in figure:
            rounds = ", ".join(f"{x:.0f}" for x in figure["rounds_ms"])
            lines.append(
                f"start-up      sidecar {name}: ready {figure['median_ms']:.0f} ms after launch"
                f" (median; rounds: {rounds} ms)"
            )
    if "pgbouncer" in startup:
        lines.append(
            f"start-up      pgbouncer: ready {startup['pgbouncer']['once_ms']:.0f} ms after"
            " launch (once)"
        )
    for build, imports in startup.get("importtime", {}).items():
        shown = ", ".join(f"{'  ' * x['nested']}{x['module']} {x['ms']:.0f}" for x in imports[:8])
        lines.append(f"start-up      imports ({build}, -X importtime, cumulative ms): {shown}")
    for name, split in extras.get("cpu_split", {}).items():
        what = " (bench/floor.py: 1:1 uvloop forwarder, no parsing, no pooling)"
        lines.append(
            f"cpu split     {name:<12} user {split['user_s']:.3f} s + system"
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


def render_chart(passes: list[dict[str, Any]], meta: dict[str, Any], paths: list[Path]) -> None:
    """Grouped bars of median tps: one row of panels per pass (clear, tls), one panel per
    workload, clients on x, one bar per target (direct, PgBouncer, the compiled and the pure
    sidecar, the floor). Each sidecar bar is labelled with its sidecar/PgBouncer ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = [p for p in passes if p["cells"]]
    all_cells = [c for p in passes for c in p["cells"]]
    workloads = [w for w in WORKLOADS if any(c["workload"] == w for c in all_cells)]
    names = _present(all_cells)
    fig, axes = plt.subplots(
        len(passes),
        len(workloads),
        figsize=(4.4 * len(workloads), 4.0 * len(passes) + 0.6),
        squeeze=False,
    )
    colors = {
        "direct": "#9e9e9e",
        "pgbouncer": "#4c72b0",
        "sidecar": "#dd8452",
        "sidecar-pure": "#f2c49b",
        "floor": "#55a868",
    }
    labels = {"sidecar": "sidecar (compiled)", "sidecar-pure": "sidecar (pure Python)",
              "floor": "floor (1:1 forwarder)"}  # fmt: skip
    width = 0.8 / len(names)
    for row, p in zip(axes, passes, strict=True):
        for ax, workload in zip(row, workloads, strict=True):
            mine = [c for c in p["cells"] if c["workload"] == workload]
            top = max(
                (t["median_tps"] or 0 for c in mine for t in c["targets"].values()), default=0
            )
            for i, cell in enumerate(mine):
                for j, target in enumerate(names):
                    if target not in cell["targets"]:
                        continue
                    tps = cell["targets"][target]["median_tps"]
                    x = i + (j - (len(names) - 1) / 2) * width
                    if tps is None:
                        ax.text(
                            x, top * 0.02, "n/a", ha="center", va="bottom", fontsize=6, rotation=90
                        )
                        continue
                    ax.bar(x, tps, width, color=colors[target], label=labels.get(target, target))
                    if target == "sidecar" and cell["sidecar_over_pgbouncer"] is not None:
                        ax.text(
                            x,
                            tps,
                            f"{cell['sidecar_over_pgbouncer']:.2f}",
                            ha="center",
                            va="bottom",
                            fontsize=6,
                        )
            ax.set_xticks(range(len(mine)), [f"{c['clients']} cl" for c in mine])
            ax.set_title(f"{WORKLOADS[workload][0]}, {p['name']} (sslmode={p['server_sslmode']})",
                         fontsize=9)  # fmt: skip
            ax.set_ylabel("median tps")
            ax.set_ylim(0, top * 1.15 or 1)
            ax.grid(axis="y", alpha=0.3)
    by_label: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            by_label.setdefault(label, handle)
    fig.legend(list(by_label.values()), list(by_label), loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(
        f"pgbench median tps, pool {meta['pool_size']}, {meta['seconds']} s x "
        f"{meta['rounds']} interleaved rounds, {meta['cpus']} CPUs shared by all processes"
        " (label: sidecar/pgbouncer tps)",
        fontsize=9,
        x=0.01,
        ha="left",
    )
    height = 4.0 * len(passes) + 0.6
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1 - 0.3 / height))
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)
