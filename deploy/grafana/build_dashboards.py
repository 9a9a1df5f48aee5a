"""Writes the Grafana dashboards of deploy/grafana/dashboards/ (classic JSON model).

Run `python deploy/grafana/build_dashboards.py` after changing a panel;
tests/observability checks that the JSON files match this script's output, lints
them, and evaluates every query against a real Prometheus scraping a live cluster."""
from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job",instance=~"$instance"'
RI = "$__rate_interval"
HIT = 'result="hit"'


def sel(metric: str, extra: str = "") -> str:
    return f"{metric}{{{SEL}{',' + extra if extra else ''}}}"


def rate(metric: str, extra: str = "") -> str:
    return f"rate({sel(metric, extra)}[{RI}])"


def quantile(q: float, metric: str, by: str, extra: str = "") -> str:
    return (f"histogram_quantile({q}, sum by (le, {by}) "
            f"({rate(metric + '_bucket', extra)}))")


def target(expr: str, legend: str, ref: str = "A", **kw) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, **kw}


def panel(kind: str, title: str, description: str, unit: str, targets: list[dict],
          w: int = 12, h: int = 8, **options) -> dict:
    p = {"type": kind, "title": title, "description": description, "datasource": DS,
         "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "gridPos": {"w": w, "h": h}}
    p["fieldConfig"]["defaults"].update(options.pop("defaults", {}))
    p.update(options)
    return p


def variables(cpu: bool) -> list[dict]:
    v = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
         "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0},
        {"name": "job", "type": "query", "datasource": DS, "label": "Job",
         "query": {"query": "label_values(up, job)", "refId": "job"},
         "definition": "label_values(up, job)", "refresh": 2, "multi": True,
         "includeAll": True, "allValue": ".+", "current": {"text": "All", "value": "$__all"},
         "sort": 1, "hide": 0},
        {"name": "instance", "type": "query", "datasource": DS, "label": "Instance",
         "query": {"query": 'label_values(up{job=~"$job"}, instance)', "refId": "instance"},
         "definition": 'label_values(up{job=~"$job"}, instance)', "refresh": 2, "multi": True,
         "includeAll": True, "allValue": ".+", "current": {"text": "All", "value": "$__all"},
         "sort": 1, "hide": 0},
    ]
    if cpu:
        q = 'label_values(tlbsim_tlb_lookups_total{job=~"$job"}, cpu)'
        v.append({"name": "cpu", "type": "query", "datasource": DS, "label": "CPU",
                  "query": {"query": q, "refId": "cpu"}, "definition": q, "refresh": 2,
                  "multi": True, "includeAll": True, "allValue": ".+",
                  "current": {"text": "All", "value": "$__all"}, "sort": 3, "hide": 0})
    return v


def layout(panels: list[dict]) -> list[dict]:
    x = y = row_h = 0
    for i, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        p["id"] = i
        x, row_h = x + w, max(row_h, h)
    return panels


def dashboard(uid: str, title: str, description: str, panels: list[dict], cpu: bool) -> dict:
    return {
        "id": None, "uid": uid, "title": title, "description": description,
        "tags": ["tlbsim"], "timezone": "browser", "editable": False,
        "schemaVersion": 39, "version": 1, "refresh": "10s",
        "time": {"from": "now-15m", "to": "now"},
        "templating": {"list": variables(cpu)},
        "annotations": {"list": [ALERT_ANNOTATIONS]},
        "links": [],
        "panels": layout(panels),
    }


# Every alert of deploy/prometheus/rules while it fires, as a marker on every panel.
ALERT_ANNOTATIONS = {
    "name": "Firing alerts", "datasource": DS, "enable": True, "iconColor": "red",
    "expr": f'ALERTS{{alertstate="firing",{SEL}}}', "step": "10s",
    "titleFormat": "{{alertname}}", "textFormat": "{{severity}}: {{instance}}",
    "tagKeys": "alertname,severity", "useValueForTime": False,
}

RED_GREEN = {"thresholds": {"mode": "absolute", "steps": [
    {"color": "green", "value": None}, {"color": "red", "value": 1}]},
    "color": {"mode": "thresholds"}}


def safety_stat(title: str, metric: str, description: str) -> dict:
    """The largest count a run reached over the time range; red unless 0."""
    return panel("stat", title, description, "none",
                 [target(f"sum(max_over_time({sel(metric)}[$__range]))", title.lower())],
                 w=6, h=5, defaults=RED_GREEN,
                 options={"colorMode": "background", "graphMode": "none", "textMode": "value",
                          "reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                            "values": False}})


def overview() -> dict:
    panels = [
        safety_stat("Stale accesses", "tlbsim_stale_accesses_total",
                    "TLB hits on a revoked translation counted by the safety oracle over the "
                    "time range (the largest count a run reached). Anything but 0 is a "
                    "coherence bug: only the deliberately unsafe policies may cause it."),
        safety_stat("Frames freed before their flush", "tlbsim_frames_freed_without_ack_total",
                    "Frames returned to the allocator while a target of the shootdown "
                    "covering them had neither acknowledged nor been fenced (the largest count "
                    "a run reached). Only --unsafe free-before-flush may cause it."),
        safety_stat("Audit violations", "tlbsim_audit_violations_total",
                    "TLB entries an audit found that the page tables no longer allow (the "
                    "largest count a run reached); 0 unless a policy is unsafe."),
        safety_stat("Lock-order inversions", "tlbsim_lock_order_violations_total",
                    "Lock acquisitions the lock validator refused because they broke the "
                    "order mmap_lock -> rmap -> page_table_lock -> ptl (the largest count a "
                    "run reached): --lock lock-all-sharers-unordered shows why Linus feared "
                    "that design."),
        panel("stat", "CPUs online",
              "CPUs registered with the coordinator and not fenced, out of those registered.",
              "none",
              [target(f"sum({sel('tlbsim_cpus_online')})", "online"),
               target(f"sum({sel('tlbsim_cpus_registered')})", "registered")],
              w=6, h=5, options={"graphMode": "none", "textMode": "value_and_name",
                                 "reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                                   "values": False}}),
        panel("table", "Active policy",
              "Version and policy of the run each service is executing (tlbsim_build_info).",
              "none", [target(sel("tlbsim_build_info", 'service=~"memory|coordinator"'), "",
                              instant=True, format="table")], w=18, h=5),
        panel("timeseries", "Shootdowns/s by reason",
              "Shootdowns delivered by the coordinator per second, by the operation that "
              "caused them (munmap, madvise, mprotect, cow, fork, exit).", "ops",
              [target(f"sum by (reason) ({rate('tlbsim_shootdowns_total')})", "{{reason}}")]),
        panel("timeseries", "Shootdowns/s by transport",
              "Shootdowns per second by the transport that delivered them (grpc: a call per "
              "target; stream: a push on each target's stream; mqtt: one broadcast).", "ops",
              [target(f"sum by (transport) ({rate('tlbsim_shootdowns_total')})",
                      "{{transport}}")]),
        panel("timeseries", "IPIs/s by transport",
              "Flush deliveries to target CPUs per second, and those that found nothing to "
              "flush because the CPU's generation was already current.", "ops",
              [target(f"sum by (transport) ({rate('tlbsim_ipis_total')})", "{{transport}} sent"),
               target(f"sum by (transport) ({rate('tlbsim_ipis_elided_total')})",
                      "{{transport}} elided")]),
        panel("timeseries", "IPIs/s per target CPU",
              "Flush deliveries per second to each target CPU (counted by the coordinator): "
              "which CPUs the shootdowns interrupt.", "ops",
              [target(f"sum by (cpu) ({rate('tlbsim_ipis_total')})", "cpu {{cpu}}")]),
        panel("timeseries", "Shootdown latency by transport",
              "p50 and p99 time from sending a shootdown until every target acknowledged or "
              "was fenced, inside the coordinator.", "s",
              [target(quantile(0.5, "tlbsim_shootdown_duration_seconds", "transport"),
                      "p50 {{transport}}"),
               target(quantile(0.99, "tlbsim_shootdown_duration_seconds", "transport"),
                      "p99 {{transport}}")]),
        panel("timeseries", "Pages per shootdown",
              "Average PTEs cleared or write-protected per shootdown, by flush policy "
              "(per-page: 1; gather: up to a batch).", "none",
              [target(f"sum by (flush) ({rate('tlbsim_shootdown_pages_sum')}) / "
                      f"sum by (flush) ({rate('tlbsim_shootdown_pages_count')})", "{{flush}}")]),
        panel("timeseries", "TLB hit rate per CPU",
              "Share of TLB lookups that hit, per CPU.", "percentunit",
              [target(f"sum by (cpu) ({rate('tlbsim_tlb_lookups_total', HIT)}) / "
                      f"sum by (cpu) ({rate('tlbsim_tlb_lookups_total')})", "cpu {{cpu}}")],
              defaults={"min": 0, "max": 1}),
        panel("timeseries", "Faults/s by kind",
              "Page faults handled by the memory service per second: anon (first touch), cow "
              "(write to a shared page), prot and segv (refused), spurious (already mapped).",
              "ops", [target(f"sum by (kind) ({rate('tlbsim_faults_total')})", "{{kind}}")]),
        panel("timeseries", "Fault latency",
              "p50 and p99 time to handle a page fault at the memory service (walk, "
              "allocation outside the lock, install).", "s",
              [target(quantile(0.5, "tlbsim_fault_duration_seconds", "job"), "p50"),
               target(quantile(0.99, "tlbsim_fault_duration_seconds", "job"), "p99")]),
        panel("timeseries", "munmap latency",
              "p50 and p99 time of a munmap at the memory service: clearing the PTEs, the "
              "shootdowns of their gather, freeing the pages.", "s",
              [target(quantile(0.5, "tlbsim_munmap_duration_seconds", "job"), "p50"),
               target(quantile(0.99, "tlbsim_munmap_duration_seconds", "job"), "p99")]),
        panel("timeseries", "Lock wait p99 by class",
              "p99 time to acquire a lock, by lock class (mmap_lock, page_table_lock, ptl, "
              "rmap) and lock policy (mm: one page_table_lock; split: a ptl per PTE table).",
              "s", [target(quantile(0.99, "tlbsim_lock_wait_seconds", "lock_class, policy"),
                           "{{lock_class}} ({{policy}})")]),
        panel("timeseries", "Lock hold p99 by class",
              "p99 time a lock was held, by lock class and policy: with mm, a shootdown "
              "under page_table_lock holds it for the whole round trip.", "s",
              [target(quantile(0.99, "tlbsim_lock_hold_seconds", "lock_class, policy"),
                      "{{lock_class}} ({{policy}})")]),
        panel("timeseries", "Contended lock acquisitions/s",
              "Acquisitions that found the lock taken, by lock class and policy.", "ops",
              [target(f"sum by (lock_class, policy) ({rate('tlbsim_lock_contended_total')})",
                      "{{lock_class}} ({{policy}})")]),
        panel("timeseries", "Frames free and used",
              "Frames of the machine free and in use (millions by default: --frames sets "
              "them; reclaim starts below 1/32 free).", "none",
              [target(f"sum({sel('tlbsim_frames_free')})", "free"),
               target(f"sum({sel('tlbsim_frames_used')})", "used")]),
        panel("timeseries", "Frames pending free",
              "Frames taken off the page tables still waiting for their shootdown (or for "
              "the table lock to drop) before they are freed: a handful, on their own axis.",
              "none", [target(f"sum({sel('tlbsim_frames_pending_free')})", "pending free")]),
        panel("timeseries", "Frame wait for flush p99",
              "p99, per frame, of the time from its gather opening until its shootdown "
              "completed: how long freed memory waits for TLB coherence.", "s",
              [target(quantile(0.99, "tlbsim_frame_flush_wait_seconds", "job"), "p99"),
               target(quantile(0.5, "tlbsim_frame_flush_wait_seconds", "job"), "p50")]),
        panel("timeseries", "Reclaim and swap/s",
              "Pages reclaimed, PTEs turned into swap entries and pages swapped back in per "
              "second, and the IPIs of reclaim's batched flushes (--shared-flush decides "
              "their targets).", "ops",
              [target(f"sum({rate('tlbsim_pages_reclaimed_total')})", "pages reclaimed"),
               target(f"sum({rate('tlbsim_swap_outs_total')})", "swap-outs"),
               target(f"sum({rate('tlbsim_swap_ins_total')})", "swap-ins"),
               target(f"sum({rate('tlbsim_reclaim_ipis_total')})", "reclaim IPIs")]),
        panel("timeseries", "Deadline misses/s",
              "Targets that did not acknowledge a shootdown in time and were fenced.", "ops",
              [target(f"sum by (transport) ({rate('tlbsim_deadline_misses_total')})",
                      "{{transport}}")]),
        panel("timeseries", "MQTT fallbacks and gRPC-only shootdowns/s",
              "mqtt transport: targets that did not ack the broadcast within its share of "
              "the deadline and got a direct gRPC Flush, and shootdowns sent over gRPC "
              "because the broker was down.", "ops",
              [target(f"sum({rate('tlbsim_mqtt_fallbacks_total')})", "fallbacks"),
               target(f"sum({rate('tlbsim_mqtt_broker_down_shootdowns_total')})",
                      "shootdowns with the broker down")]),
        panel("timeseries", "MQTT broker down",
              "Share of the time the coordinator had no connection to its MQTT broker "
              "(always 0 without --mqtt-url).", "percentunit",
              [target(f"sum({rate('tlbsim_mqtt_broker_down_seconds_total')})", "down")],
              defaults={"min": 0, "max": 1}),
        panel("timeseries", "Redeliveries and unknown targets/s",
              "Flushes sent again after a failed delivery (lost, or the CPU restarting), and "
              "shootdown targets a restarted coordinator did not know yet.", "ops",
              [target(f"sum({rate('tlbsim_redeliveries_total')})", "redeliveries"),
               target(f"sum({rate('tlbsim_unknown_targets_total')})", "unknown targets")]),
        panel("timeseries", "Fork latency p99 by mode",
              "p99 fork time at the memory service, by fork mode (copy: PTE copies; share: "
              "shared page tables).", "s",
              [target(quantile(0.99, "tlbsim_fork_duration_seconds", "mode"), "{{mode}}")]),
        panel("timeseries", "Page tables",
              "PTE tables shared between mms, and unshares (table copies on write) per second.",
              "none", [target(f"sum({sel('tlbsim_shared_page_tables')})", "shared tables"),
                       target(f"sum({rate('tlbsim_unshares_total')})", "unshares/s")]),
        panel("timeseries", "Virtual time per CPU",
              "--timing virtual: each CPU's virtual clock (the cost model's hardware time "
              "since the run began) and the part of it spent in IPI handlers for other "
              "CPUs' shootdowns. Flat at 0 in wall-clock runs.", "s",
              [target(f"max by (cpu) ({sel('tlbsim_cpu_virtual_clock_seconds')})",
                      "cpu {{cpu}}"),
               target("max by (cpu) (" + sel("tlbsim_cpu_virtual_busy_seconds",
                                             'what="handler"') + ")",
                      "cpu {{cpu}} handlers", "B")]),
        panel("timeseries", "Virtual throughput",
              "--timing virtual: accesses per virtual second, summed over the CPUs (the "
              "machine's modelled throughput, independent of how loaded the host is).",
              "ops", [target(f"sum({sel('tlbsim_cpu_virtual_accesses_per_second')})",
                             "accesses per virtual s")]),
        panel("timeseries", "Modelled hardware time by component",
              "What the counted events would cost on hardware under the run's cost model "
              "(--cost-model; README, Cost model), in modelled seconds per second of wall "
              "time: walks (TLB misses), invalidations, IPIs, locks, faults.", "s",
              [target(f"sum by (component, cost_model) "
                      f"({rate('tlbsim_modelled_seconds_total')})",
                      "{{component}} ({{cost_model}})")]),
    ]
    return dashboard("tlbsim-overview", "tlbsim overview",
                     "Shootdowns, IPIs, latency, TLB hit rate, faults, locks, frames, reclaim, "
                     "MQTT delivery and the safety oracle of a tlbsim cluster; firing alerts "
                     "are marked on every panel.", panels, cpu=False)


def per_cpu() -> dict:
    c = 'cpu=~"$cpu"'
    panels = [
        panel("stat", "Fenced", "1 while the CPU is fenced (missed a shootdown deadline).",
              "none", [target(f"max by (cpu) ({sel('tlbsim_cpu_fenced', c)})", "cpu {{cpu}}")],
              w=8, h=6, defaults=RED_GREEN,
              options={"colorMode": "background", "graphMode": "none",
                       "reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                         "values": False}}),
        panel("timeseries", "TLB entries", "Live entries in each CPU's TLB.", "none",
              [target(f"sum by (cpu) ({sel('tlbsim_tlb_entries', c)})", "cpu {{cpu}}")],
              w=16, h=6),
        panel("timeseries", "TLB lookups/s", "Lookups per second by result.", "ops",
              [target(f"sum by (cpu, result) ({rate('tlbsim_tlb_lookups_total', c)})",
                      "cpu {{cpu}} {{result}}")]),
        panel("timeseries", "TLB hit rate", "Share of lookups that hit.", "percentunit",
              [target(f"sum by (cpu) ({rate('tlbsim_tlb_lookups_total', c + ',' + HIT)}) / "
                      f"sum by (cpu) ({rate('tlbsim_tlb_lookups_total', c)})", "cpu {{cpu}}")],
              defaults={"min": 0, "max": 1}),
        panel("timeseries", "Flushes/s by kind",
              "Flushes applied: range (page by page), full (the whole mm, incl. catching up at "
              "switch_mm), elided (the generation was already current).", "ops",
              [target(f"sum by (cpu, kind) ({rate('tlbsim_tlb_flushes_total', c)})",
                      "cpu {{cpu}} {{kind}}")]),
        panel("timeseries", "Flush requests and page invalidations/s",
              "Flush requests received from the coordinator and single pages invalidated by "
              "range flushes.", "ops",
              [target(f"sum by (cpu) ({rate('tlbsim_flush_requests_total', c)})",
                      "cpu {{cpu}} requests"),
               target(f"sum by (cpu) ({rate('tlbsim_tlb_page_invalidations_total', c)})",
                      "cpu {{cpu}} pages")]),
        panel("timeseries", "IPIs received/s",
              "Flush deliveries per second to this CPU, by transport (counted by the "
              "coordinator).", "ops",
              [target(f"sum by (cpu, transport) ({rate('tlbsim_ipis_total', c)})",
                      "cpu {{cpu}} {{transport}}")]),
        panel("timeseries", "Page walks/s", "Walks at the memory service by kind (batch: "
              "read-ahead of up to 64 pages; miss: one page, may fault).", "ops",
              [target(f"sum by (cpu, kind) ({rate('tlbsim_page_walks_total', c)})",
                      "cpu {{cpu}} {{kind}}")]),
        panel("timeseries", "Page walk latency",
              "p50 and p99 round trip of a page walk to the memory service.", "s",
              [target(quantile(0.5, "tlbsim_page_walk_duration_seconds", "cpu", c),
                      "p50 cpu {{cpu}}"),
               target(quantile(0.99, "tlbsim_page_walk_duration_seconds", "cpu", c),
                      "p99 cpu {{cpu}}")]),
        panel("timeseries", "TLB evictions/s", "Live entries evicted by LRU.", "ops",
              [target(f"sum by (cpu) ({rate('tlbsim_tlb_evictions_total', c)})",
                      "cpu {{cpu}}")], w=24),
    ]
    return dashboard("tlbsim-cpu", "tlbsim per CPU",
                     "One simulated CPU (or several): its TLB, flushes and page walks.",
                     panels, cpu=True)


DASHBOARDS = {"tlbsim-overview.json": overview, "tlbsim-cpu.json": per_cpu}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


if __name__ == "__main__":
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}", file=sys.stderr)
