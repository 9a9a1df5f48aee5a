"""`tlbsim load soak`: the mixed workload for a long time, with periodic faults.

The soak runs `mixed` in segments (each one run: reset, load, audit, collect; the
transport rotates grpc → stream → mqtt) on a local cluster whose processes it can kill —
its own, or a `tlbsim up --detach` cluster's (the state file). With --chaos, every
--chaos-every seconds it injects one fault (services/common/chaos.py SOAK_KINDS, in a
seeded shuffled cycle, so every kind comes up), holds it, heals it, and waits for every
CPU to be registered and unfenced again. Faults never overlap a segment's reset, setup
or final audit. It counts, continuously: stale accesses (the oracle), audit violations,
frames freed without acknowledgement (the memory service), hung calls (a call that
outlived its deadline + grace: a deadline that did not work), and checks that every CPU
rejoined. Any of those fails the soak (exit 1).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
import time

import grpc

from loadgen import output
from loadgen.cluster import Cluster
from loadgen.injector import Injector, Settings, lasting
from loadgen.runner import collect, on_sigint
from loadgen.scenarios import mixed
from loadgen.scenarios.base import Driver, Measurements, RunConfig
from services.common.chaos import CPU_KINDS, SOAK_KINDS
from services.common.errors import FailedPrecondition, SimError
from services.common.policy import Policy, Transport
from services.launcher import LocalCluster, mosquitto_binary
from tlbsim.v1 import coordinator_pb2, memory_pb2

log = logging.getLogger("tlbsim.soak")

REPORT_VERSION = 1
CALL_DEADLINE_S = 30.0  # every load call's deadline in the soak
HUNG_GRACE_S = 5.0      # a call still running this long after its deadline hung
REJOIN_TIMEOUT_S = 30.0  # every CPU registered and unfenced again after a fault (at least)
RECOVER_TIMEOUT_S = 60.0  # a segment that cannot start for this long: the cluster is lost
MAX_ERRORS_KEPT = 20


@dataclasses.dataclass
class SoakConfig:
    duration_s: float
    cpus: int = 4
    chaos: bool = True
    chaos_every_s: float = 5.0
    seed: int = 0
    segment_s: float = 20.0  # one run of `mixed`
    deadline_s: float = 1.0
    pages: int = 64

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class ChaosSchedule:
    """Which fault comes next: the kinds in a seeded shuffled cycle (each kind once per
    cycle, so a short soak still sees every kind), and a seeded target CPU."""

    def __init__(self, kinds: list[str], cpus: list[int], seed: int):
        if not kinds:
            raise ValueError("no fault kinds to schedule")
        self.kinds, self.cpus = list(kinds), list(cpus)
        self.rng = random.Random(seed)
        self._cycle: list[str] = []

    def next(self) -> tuple[str, int]:
        if not self._cycle:
            self._cycle = self.kinds[:]
            self.rng.shuffle(self._cycle)
        return self._cycle.pop(), self.rng.choice(self.cpus)


@dataclasses.dataclass
class Tally:
    """What the soak counted; becomes the JSON report."""
    segments: int = 0
    ops: int = 0
    syscalls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    shootdowns: int = 0
    injected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    stale_accesses: int = 0
    audit_violations: int = 0
    audit_entries_checked: int = 0
    frames_freed_without_ack: int = 0
    hung_calls: int = 0
    timed_out_calls: int = 0  # failed with DEADLINE_EXCEEDED at their deadline: not hung
    failed_calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    deadline_misses: int = 0  # targets the coordinator fenced at a deadline
    cpus_left: int = 0        # times a CPU left a segment (killed, unreachable, not back)
    fenced_waits: int = 0     # calls that found their CPU fenced and waited for it to rejoin
    fenced_seen: int = 0      # CPUs seen fenced or unregistered during a fault
    rejoined: int = 0         # ... and seen registered and unfenced again after it
    redeliveries: int = 0
    unknown_targets: int = 0
    shootdown_retries: int = 0
    rejoin_s: list[float] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    violations: list[str] = dataclasses.field(default_factory=list)

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(text)


def verdict(t: Tally) -> list[str]:
    """Everything that fails a soak."""
    bad = list(t.violations)
    for name in ("stale_accesses", "audit_violations", "frames_freed_without_ack",
                 "hung_calls"):
        if getattr(t, name):
            bad.append(f"{name}: {getattr(t, name)}")
    return bad


class SoakDriver(Driver):
    """The Driver with the soak's call deadline, counting calls that outlive it."""
    call_timeout_s = CALL_DEADLINE_S

    def __init__(self, cluster: Cluster, m: Measurements, tally: Tally):
        super().__init__(cluster, m)
        self.tally = tally

    async def _attempt(self, method, request, timeout: float):
        """Each attempt of a call (Driver._call makes them): failures by status, and a
        call that outlived its deadline by HUNG_GRACE_S is hung."""
        t0 = time.monotonic()
        try:
            return await super()._attempt(method, request, timeout)
        except grpc.aio.AioRpcError as e:
            self.tally.failed_calls[e.code().name] += 1
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.tally.timed_out_calls += 1
            raise
        finally:
            if time.monotonic() - t0 > timeout + HUNG_GRACE_S:
                self.tally.hung_calls += 1

    def cpu_left(self, cpu) -> None:
        self.tally.cpus_left += 1


class Soak:
    def __init__(self, cfg: SoakConfig, local: LocalCluster, cluster: Cluster):
        self.cfg, self.local, self.cluster = cfg, local, cluster
        self.injector = Injector(local)
        self.tally = Tally()
        self.quiet = asyncio.Lock()  # held by a fault, and by a segment's reset/setup/audit
        self.stopping = False
        self.started = 0.0
        self.current = Measurements()
        kinds = [k for k in SOAK_KINDS if k != "stop-broker" or self.injector.info.mqtt]
        self.schedule = ChaosSchedule(kinds, self.injector.cpus()[:cfg.cpus], cfg.seed)
        self.transports = [Transport.GRPC, Transport.STREAM] + ([Transport.MQTT] if self.injector.info.mqtt
                                                                else [])

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def time_left(self) -> float:
        return self.cfg.duration_s - self.elapsed()

    # --- the load -----------------------------------------------------------------------
    async def segments(self) -> None:
        i = 0
        while not self.stopping and self.time_left() > 1.0:
            length = min(self.cfg.segment_s, self.time_left())
            await self.segment(i, length)
            i += 1

    async def segment(self, i: int, length: float) -> None:
        transport = self.transports[i % len(self.transports)]
        policy = Policy(transport=transport, deadline_s=self.cfg.deadline_s)
        run = RunConfig("mixed", policy, cpus=self.cfg.cpus, pages=self.cfg.pages,
                        duration=length, seed=self.cfg.seed * 1000 + i)
        m = self.current = Measurements()
        d = SoakDriver(self.cluster, m, self.tally)
        await self.quiet.acquire()
        try:
            epoch = await self._reset(run)
        except BaseException:
            self.quiet.release()
            raise
        released = False

        def progress(done: int) -> None:  # the first round done: setup is over
            nonlocal released
            if not released:
                released = True
                self.quiet.release()

        t0 = time.perf_counter()
        try:
            await mixed.run(d, run, progress)
        except (SimError, grpc.aio.AioRpcError) as e:
            self.tally.error(f"segment {i} ({transport}): {_describe(e)}")
        finally:
            if not released:
                self.quiet.release()
        duration = time.perf_counter() - t0
        async with self.quiet:  # no fault during the final audit
            await self._collect(run, m, duration, epoch)
        self.tally.segments += 1

    async def _reset(self, run: RunConfig) -> int:
        give_up = time.monotonic() + RECOVER_TIMEOUT_S
        while True:
            try:
                await self.cluster.discover(run.cpus, wait_s=self.rejoin_timeout())
                return await self.cluster.reset(run.policy, run.cpus)
            except (SimError, grpc.aio.AioRpcError) as e:
                if time.monotonic() > give_up:
                    self.tally.violations.append(f"the cluster did not recover: {_describe(e)}")
                    raise FailedPrecondition("the cluster did not recover") from None
                self.tally.error(f"reset: {_describe(e)}")
                await asyncio.sleep(1.0)

    async def _collect(self, run: RunConfig, m: Measurements, duration: float,
                       epoch: int) -> None:
        t = self.tally
        try:
            report = await collect(self.cluster, run, m, duration, epoch)
            mem = await self.cluster.memory.Stats(memory_pb2.MemoryStatsRequest(), timeout=30)
            coord = await self.cluster.coordinator.Stats(
                coordinator_pb2.CoordinatorStatsRequest(), timeout=30)
        except (SimError, grpc.aio.AioRpcError) as e:
            t.error(f"collect: {_describe(e)}")
            return
        r = report["results"]
        t.ops += r["ops"]
        t.syscalls.update(r["syscalls"])
        t.shootdowns += r["shootdowns"]
        t.stale_accesses += r["stale_accesses"]
        t.audit_violations += r["audit_violations"]
        t.audit_entries_checked += r["audit_entries_checked"]
        t.deadline_misses += r["deadline_misses"]
        t.fenced_waits += m.fenced_waits
        t.frames_freed_without_ack += mem.frames_freed_without_ack
        t.shootdown_retries += mem.shootdown_retries
        t.redeliveries += coord.redeliveries
        t.unknown_targets += coord.unknown_targets
        for v in report["violations"]:
            t.violations.append(f"audit: {v}")

    # --- the faults ---------------------------------------------------------------------
    async def chaos(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.cfg.chaos_every_s)
            if self.stopping or self.time_left() < 10.0:
                return  # the last seconds stay calm: the final segment audits a settled machine
            kind, cpu = self.schedule.next()
            async with self.quiet:
                await self.inject(kind, cpu)

    async def inject(self, kind: str, cpu: int) -> None:
        """One fault: inject, hold, heal; then wait for every CPU to rejoin."""
        # Long enough to be fenced and for the lease to run out.
        hold = self.cfg.deadline_s + self.cluster.liveness.settle_s
        seen: set[int] = set()
        watch = asyncio.create_task(self._watch(seen))
        log.warning("chaos: %s (cpu %d)", kind, cpu)
        try:
            # Every CPU kind draws a seed (only drop-flushes uses it): the seeded cycle
            # of faults stays what it was.
            seed = self.schedule.rng.randrange(1 << 30) if kind in CPU_KINDS else 0
            await self.injector.inject(kind, cpu, Settings(
                ack_delay_s=self.cfg.deadline_s + 1.0, drop_fraction=0.5, seed=seed))
            if kind == "kill-cpu":
                seen.add(cpu)
            if lasting(kind):
                await asyncio.sleep(hold)
                await self.injector.heal(kind, cpu)
            self.tally.injected[kind] += 1
            t0 = time.monotonic()
            if await self._rejoined():
                self.tally.rejoin_s.append(time.monotonic() - t0)
            else:
                self.tally.violations.append(
                    f"after {kind} (cpu {cpu}) the CPUs were not all registered and "
                    f"unfenced within {self.rejoin_timeout():.0f} s")
        except SimError as e:
            self.tally.error(f"chaos {kind}: {e.message}")
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        self.tally.fenced_seen += len(seen)
        self.tally.rejoined += len(seen)  # _rejoined() saw them all back (else a violation)

    async def _listing(self):
        return await self.cluster.coordinator.ListCpus(coordinator_pb2.ListCpusRequest(),
                                                       timeout=2)

    async def _watch(self, seen: set[int]) -> None:
        """While a fault lasts: which CPUs were ever fenced or unregistered."""
        want = set(self.injector.cpus()[:self.cfg.cpus])
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                listing = await self._listing()
                ok = {c.cpu for c in listing.cpus if not c.fenced}
                seen.update(want - ok)
            await asyncio.sleep(0.1)

    def rejoin_timeout(self) -> float:
        return max(REJOIN_TIMEOUT_S, self.cluster.liveness.rejoin_s)

    async def _rejoined(self) -> bool:
        want = set(self.injector.cpus()[:self.cfg.cpus])
        give_up = time.monotonic() + self.rejoin_timeout()
        while time.monotonic() < give_up:
            with contextlib.suppress(grpc.aio.AioRpcError):
                listing = await self._listing()
                if want <= {c.cpu for c in listing.cpus if not c.fenced}:
                    return True
            await asyncio.sleep(0.1)
        return False

    # --- the whole soak -------------------------------------------------------------------
    async def run(self, progress=lambda done: None) -> dict:
        self.started = time.monotonic()
        tasks = [asyncio.create_task(self.segments())]
        if self.cfg.chaos:
            tasks.append(asyncio.create_task(self.chaos()))

        async def tick() -> None:
            while True:
                progress(int(self.elapsed()))
                await asyncio.sleep(1.0)

        ticker = asyncio.create_task(tick())
        interrupted = False
        with _ctrl_c(self):
            try:
                await tasks[0]
            except (asyncio.CancelledError, KeyboardInterrupt):
                interrupted = True
            except SimError as e:
                self.tally.error(f"soak stopped: {e.message}")
            finally:
                self.stopping = True
                for task in tasks[1:]:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, SimError):
                        await task
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError, SimError):
                    await self.injector.heal_all()
        return self.report(interrupted)

    def report(self, interrupted: bool = False) -> dict:
        t = self.tally
        bad = verdict(t)
        rejoin = sorted(t.rejoin_s)
        return {
            "version": REPORT_VERSION, "kind": "soak", "config": self.cfg.as_dict(),
            "interrupted": interrupted, "ok": not bad,
            "results": {
                "duration_s": round(self.elapsed(), 1), "segments": t.segments,
                "ops": t.ops, "syscalls": dict(sorted(t.syscalls.items())),
                "shootdowns": t.shootdowns, "injected": dict(sorted(t.injected.items())),
                "faults_injected": sum(t.injected.values()),
                "stale_accesses": t.stale_accesses, "audit_violations": t.audit_violations,
                "audit_entries_checked": t.audit_entries_checked,
                "frames_freed_without_ack": t.frames_freed_without_ack,
                "hung_calls": t.hung_calls, "timed_out_calls": t.timed_out_calls,
                "failed_calls": dict(sorted(t.failed_calls.items())),
                "deadline_misses": t.deadline_misses, "cpus_left": t.cpus_left,
                "fenced_waits": t.fenced_waits,
                "fenced_seen": t.fenced_seen, "rejoined": t.rejoined,
                "rejoin_s_max": round(rejoin[-1], 2) if rejoin else 0.0,
                "redeliveries": t.redeliveries, "unknown_targets": t.unknown_targets,
                "shootdown_retries": t.shootdown_retries,
            },
            "errors": t.errors, "violations": bad[:50],
        }


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return getattr(e, "message", str(e))


def _ctrl_c(soak: Soak):
    """Ctrl-C: no new segment starts; the running one finishes and is audited."""
    return on_sigint(lambda: setattr(soak, "stopping", True))


def run_soak(cfg: SoakConfig, state: str | None = None, log_dir=None) -> dict:
    """Start a local cluster (or adopt the `tlbsim up --detach` one of `state`), soak it,
    stop what was started; the report."""
    from services.launcher import load_state, state_path, write_state

    own = state is None
    if own:
        local = LocalCluster()
        info = local.start(cfg.cpus, log_dir, mqtt=mosquitto_binary() is not None)
    else:
        info = load_state(state)
        local = LocalCluster.adopt(info)
        if len(info.cpus) < cfg.cpus:
            raise FailedPrecondition(f"the cluster has {len(info.cpus)} CPUs; the soak "
                                     f"needs {cfg.cpus}")
    try:
        async def main() -> dict:
            async with Cluster(info.coordinator) as cluster:
                soak = Soak(cfg, local, cluster)
                with output.progress(int(cfg.duration_s), "soak") as advance:
                    return await soak.run(advance)
        return asyncio.run(main())
    finally:
        if own:
            local.stop()
        else:
            write_state(state_path(state), info)  # restarted processes: new pids
