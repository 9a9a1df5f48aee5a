"""Several simulated CPUs in one process (`serve cpu --ids 0-15`, `up --cpus-per-process
K`): which ids a process hosts, how N CPUs are split into processes, and how one listen
or metrics setting becomes one per hosted CPU. Pure: no gRPC, no processes.

Each hosted CPU is still its own gRPC server on its own port with its own metrics port,
so nothing outside the process can tell K co-hosted CPUs from K processes, except that
they die together."""
from __future__ import annotations

from services.common.errors import InvalidArgument

MAX_CPU_ID = 1023  # ids are 0..1023 (the coordinator's and the memory service's bound)

# `tlbsim up` without --cpus-per-process: one CPU per process up to this many CPUs (a
# crash is one CPU, as on a real machine), beyond it as few processes as this many.
# Measured on 2 cores (README "256 CPUs"): a CPU process costs ~46 MiB and ~1 CPU-second
# of imports, a co-hosted CPU ~0.2 MiB idle and no imports; but a process is one core of
# Python, so not all in one (fault-scaling at 16 CPUs took twice as long in one process).
SEPARATE_UP_TO = 8
MAX_PROCESSES = 8


def parse_ids(text: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8]: ranges and single ids, comma-separated, each id once,
    every id in 0..MAX_CPU_ID. InvalidArgument, in one line, otherwise."""
    ids: list[int] = []
    seen: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:
            raise InvalidArgument(f"--ids {text!r}: {part!r} is not an id or a range "
                                  "FIRST-LAST (e.g. 0-15 or 0-3,8)") from None
        if first > last:
            raise InvalidArgument(f"--ids {text!r}: the range {part} runs backwards")
        if first < 0 or last > MAX_CPU_ID:
            raise InvalidArgument(f"--ids {text!r}: ids are 0..{MAX_CPU_ID}")
        for cpu in range(first, last + 1):
            if cpu in seen:
                raise InvalidArgument(f"--ids {text!r}: cpu {cpu} is listed twice")
            seen.add(cpu)
            ids.append(cpu)
    return ids


def format_ids(ids: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8' (what parse_ids reads back)."""
    parts: list[str] = []
    run: list[int] = []
    for cpu in ids:
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            parts.append(_span(run))
        run = [cpu]
    if run:
        parts.append(_span(run))
    return ",".join(parts)


def _span(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def default_per_process(cpus: int) -> int:
    """K for N CPUs when not given: 1 up to SEPARATE_UP_TO CPUs, else the fewest CPUs per
    process that keeps the processes at MAX_PROCESSES."""
    if cpus <= SEPARATE_UP_TO:
        return 1
    return -(-cpus // MAX_PROCESSES)


def split(cpus: int, per_process: int) -> list[list[int]]:
    """CPUs 0..cpus-1 in consecutive groups of `per_process` (the last may be smaller)."""
    if per_process < 1:
        raise InvalidArgument(f"--cpus-per-process {per_process}: must be at least 1")
    return [list(range(first, min(first + per_process, cpus)))
            for first in range(0, cpus, per_process)]


def process_name(ids: list[int]) -> str:
    """The launcher's name for the process hosting `ids`: cpuN alone (as always), else
    cpusFIRST-LAST (its logs, its key in the state file's pids)."""
    return f"cpu{ids[0]}" if len(ids) == 1 else f"cpus{format_ids(ids)}"


def per_cpu(option: str, value: str, count: int) -> list[str]:
    """One setting of `option` per hosted CPU: a comma list of exactly `count`, or one
    value for all (`same`), as the caller then expands it."""
    values = [v.strip() for v in str(value).split(",")]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise InvalidArgument(f"{option} {value!r}: {len(values)} values for {count} CPUs "
                              "(give one, or one per CPU)")
    return values


def listen_addresses(listen: str, count: int) -> list[str]:
    """--listen for `count` CPUs: a list of `count` addresses as given; one address with
    port 0 is port 0 for each (each picks a free port); one with port P > 0 is P, P+1, ...
    (a container's CPUs on consecutive ports)."""
    addresses = per_cpu("--listen", listen, count)
    if "," in str(listen) or count == 1:
        return addresses
    host, sep, port = addresses[0].rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"--listen {listen!r}: not HOST:PORT")
    base = int(port)
    if base == 0:
        return addresses
    if base + count - 1 > 65535:
        raise InvalidArgument(f"--listen {listen!r}: ports {base}..{base + count - 1} "
                              "run past 65535")
    return [f"{host}:{base + i}" for i in range(count)]


def metrics_ports(value: str | int, count: int) -> list[int]:
    """--metrics-port for `count` CPUs: a list of `count` ports, or one: 0 (each a free
    one), -1 (none), or P > 0 (P, P+1, ...)."""
    try:
        ports = [int(v) for v in per_cpu("--metrics-port", str(value), count)]
    except ValueError:
        raise InvalidArgument(f"--metrics-port {value!r}: not a port number") from None
    for port in ports:
        if not -1 <= port <= 65535:
            raise InvalidArgument(f"--metrics-port {port}: a port 1..65535, 0 for a free "
                                  "one, or -1 for none")
    if "," not in str(value) and ports[0] > 0:
        if ports[0] + count - 1 > 65535:
            raise InvalidArgument(f"--metrics-port {value}: ports run past 65535")
        ports = [ports[0] + i for i in range(count)]
    return ports


def advertise_addresses(advertise: str | None, count: int) -> list[str | None]:
    """--advertise for `count` CPUs: HOST alone (each CPU's own bound port) serves any
    count; HOST:PORT names one CPU, so K CPUs need K of them."""
    if not advertise:
        return [None] * count
    values = per_cpu("--advertise", advertise, count)
    host, sep, port = values[0].rpartition(":")
    if count > 1 and len(set(values)) == 1 and sep and port.isdigit() and \
            not host.endswith(":"):
        raise InvalidArgument(f"--advertise {advertise!r}: one HOST:PORT for {count} CPUs; "
                              "give HOST alone (each CPU's own port) or one per CPU")
    return list(values)
