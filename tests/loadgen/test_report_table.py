"""The run table (issue 20): the scenario's headline first, rows that measured nothing
left out, every safety count shown, the configuration in the title — on reports built
here, so each case is exact (tests/loadgen/test_defaults.py runs every scenario)."""
import pytest

from loadgen import output
from loadgen.output import BLOCKS, describe, print_report, report_blocks
from loadgen.scenarios import RunConfig
from services.common.policy import Policy

NOT_TIMED = {"p50": 0.0, "p99": 0.0}


def report(scenario: str, cfg: RunConfig | None = None, **results) -> dict:
    cfg = cfg or RunConfig(scenario, Policy())
    r = {"ops": 100, "duration_s": 1.5, "rounds": cfg.rounds, "shootdowns": 0, "ipis": 0,
         "ipis_elided": 0, "pages_freed": 0, "full_flushes": 0, "faults": 0,
         "faults_per_s": 0.0, "tlb_hit_rate": 0.0, "contended_locks": 0, "unshares": 0,
         "reclaimed_pages": 0, "lock_order_violations": 0, "ops_per_s": 66.7,
         "stale_accesses": 0, "audit_violations": 0, "frames_freed_without_ack": 0,
         "deadline_misses": 0, "fenced_cpus": [], "munmap_latency_ms": NOT_TIMED,
         "fault_latency_ms": NOT_TIMED, "lock_wait_ms": NOT_TIMED,
         "shootdown_latency_ms": NOT_TIMED, "fork_latency_ms": NOT_TIMED}
    r.update(results)
    return {"scenario": scenario, "config": cfg.as_dict(), "results": r}


def shown(rep: dict) -> str:
    with output.console.capture() as cap:
        print_report(rep)
    return " ".join(cap.get().split())


def rows(rep: dict) -> dict[str, dict[str, str]]:
    return {title: dict(block) for title, block in report_blocks(rep)}


def test_fork_shows_its_headline_and_not_what_it_did_not_time():
    cfg = RunConfig("fork", Policy(fork="share"), resident=65536, children=10, rounds=2)
    rep = report("fork", cfg, fork_latency_ms={"p50": 1.09, "p99": 2.5},
                 pte_tables_allocated=0, tlb_entries_flushed=2048, shootdowns=20, ipis=60)
    blocks = rows(rep)
    assert list(blocks) == ["headline", "the run", "safety"]
    assert blocks["headline"] == {"fork latency p50 / p99": "1.09 / 2.5 ms",
                                  "PTE tables allocated": "0",
                                  "TLB entries the forks flushed": "2,048"}
    assert "munmap latency p50 / p99" not in blocks["the run"]  # no munmap was timed
    assert "pages freed" not in blocks["the run"]  # nothing freed: a zero says nothing
    text = shown(rep)
    assert "fork: 4 CPUs, 2 rounds, 65,536 resident pages, 10 children;" in text
    assert "512 pages" not in text and "fork=share" in text


def test_shared_write_shows_the_refused_writes_and_inversions():
    cfg = RunConfig("shared-write", Policy(fork="share", lock="lock-all-sharers-unordered"))
    rep = report("shared-write", cfg, unshares=0, aborted_writes=5120,
                 lock_order_violations=5120)
    head = rows(rep)["headline"]
    assert head["writes refused (lock order)"] == "5,120"
    assert head["lock-order inversions refused"] == "5,120"
    assert "lock=lock-all-sharers-unordered" in shown(rep)


def test_a_run_with_deadline_misses_says_so_though_no_cpu_is_fenced_at_the_end():
    """chaos delay-acks: 10 targets missed their deadline and were fenced, then
    registered again; the table used to say only "fenced CPUs none"."""
    rep = report("munmap", deadline_misses=10, fenced_cpus=[],
                 shootdown_latency_ms={"p50": 1060.0, "p99": 1500.0})
    safety = rows(rep)["safety"]
    assert safety["deadline misses (fences)"] == "10"
    assert safety["CPUs fenced or lost at the end"] == "none"
    assert rows(rep)["the run"]["shootdown latency p50 / p99"] == "1,060 / 1,500 ms"


@pytest.mark.parametrize("scenario", ["munmap", "tlb-flush", "swapout", "flush-ceiling"])
def test_safety_counts_are_shown_at_zero(scenario):
    safety = rows(report(scenario))["safety"]
    assert safety == {"stale accesses": "0", "audit violations": "0",
                      "frames freed before the flush": "0", "deadline misses (fences)": "0",
                      "CPUs fenced or lost at the end": "none"}


def test_tlb_flush_calls_its_latency_madvise_and_shows_its_rate():
    rep = report("tlb-flush", madvise_per_s=812.5, ipis=384,
                 munmap_latency_ms={"p50": 4.2, "p99": 9.9})
    assert rows(rep)["headline"] == {"madvise rate (calls/s)": "812",  # 3 digits
                                     "IPIs (flush deliveries)": "384",
                                     "madvise latency p50 / p99": "4.2 / 9.9 ms"}


def test_a_block_added_in_front_comes_first(monkeypatch):
    """The table is built from BLOCKS in order; one more function in front adds a block
    of rows before the headline (what a virtual-time section would do)."""
    monkeypatch.setattr(output, "BLOCKS", [lambda rep: ("virtual", [("clock", "3 ns")])]
                        + BLOCKS)
    assert [t for t, _ in report_blocks(report("munmap"))][:2] == ["virtual", "headline"]


def test_describe_names_only_what_the_scenario_reads_and_the_policy_that_differs():
    cfg = RunConfig("munmap", Policy(transport="stream", ceiling=0), pages=1, rounds=1)
    assert describe("munmap", cfg.as_dict()) == \
        "4 CPUs, 1 page, 1 round; flush=gather lock=split transport=stream ceiling=0"
    timed = RunConfig("mixed", Policy(), duration=10.0).as_dict()
    assert describe("mixed", timed).startswith("4 CPUs, 512 pages, for 10 s;")
    swept = describe("munmap", cfg.as_dict(), {"pages": "1, 8, 64"})
    assert swept.startswith("4 CPUs, 1, 8, 64 pages, 1 round;")
