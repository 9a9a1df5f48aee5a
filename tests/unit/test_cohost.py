"""services/common/cohost.py: which CPUs a process hosts (`serve cpu --ids`), how `up`
splits N CPUs into processes, and one listen/metrics/advertise setting per CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common import cohost
from services.common.errors import InvalidArgument
from services.launcher.state import ClusterInfo


def test_ids_are_ranges_and_single_ids_in_the_order_given() -> None:
    assert cohost.parse_ids("0-3,8") == [0, 1, 2, 3, 8]
    assert cohost.parse_ids("7") == [7]
    assert cohost.parse_ids(" 10-11 , 2") == [10, 11, 2]
    assert cohost.parse_ids("0-1023") == list(range(1024))


@pytest.mark.parametrize("text,words", [
    ("5-2", "runs backwards"),
    ("0-3,2", "cpu 2 is listed twice"),       # overlapping
    ("0-3,3-4", "cpu 3 is listed twice"),
    ("1000-1024", "ids are 0..1023"),          # out of range
    ("-1", "not an id or a range"),
    ("", "not an id or a range"),
    ("a-b", "not an id or a range"),
    ("0-3,", "not an id or a range"),
])
def test_bad_id_lists_are_one_line_errors(text: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        cohost.parse_ids(text)
    assert words in e.value.message and "\n" not in e.value.message


@given(st.lists(st.integers(0, cohost.MAX_CPU_ID), unique=True, min_size=1, max_size=64))
def test_format_ids_reads_back_as_the_same_list(ids: list[int]) -> None:
    assert cohost.parse_ids(cohost.format_ids(ids)) == ids


def test_format_ids_joins_runs() -> None:
    assert cohost.format_ids([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"


@pytest.mark.parametrize("cpus,k", [(1, 1), (8, 1), (9, 2), (16, 2), (64, 8), (65, 9),
                                    (256, 32)])
def test_default_is_one_per_process_up_to_8_then_at_most_8_processes(cpus: int, k: int) -> None:
    assert cohost.default_per_process(cpus) == k
    assert len(cohost.split(cpus, k)) <= cohost.MAX_PROCESSES


@given(st.integers(1, 256), st.integers(1, 256))
def test_split_covers_every_cpu_once_in_groups_of_at_most_k(cpus: int, k: int) -> None:
    groups = cohost.split(cpus, k)
    assert [i for g in groups for i in g] == list(range(cpus))
    assert all(1 <= len(g) <= k for g in groups)
    assert all(len(g) == k for g in groups[:-1])  # only the last one may be short


def test_split_refuses_fewer_than_one_per_process() -> None:
    with pytest.raises(InvalidArgument, match="at least 1"):
        cohost.split(4, 0)


def test_process_names_keep_cpuN_for_one_cpu() -> None:
    assert cohost.process_name([3]) == "cpu3"
    assert cohost.process_name([0, 1, 2, 3]) == "cpus0-3"


def test_one_listen_address_becomes_one_per_cpu() -> None:
    assert cohost.listen_addresses("127.0.0.1:0", 3) == ["127.0.0.1:0"] * 3
    assert cohost.listen_addresses("0.0.0.0:50051", 3) == \
        ["0.0.0.0:50051", "0.0.0.0:50052", "0.0.0.0:50053"]
    assert cohost.listen_addresses("a:5,b:5", 2) == ["a:5", "b:5"]  # as given
    assert cohost.listen_addresses("h:7", 1) == ["h:7"]
    with pytest.raises(InvalidArgument, match="2 values for 3 CPUs"):
        cohost.listen_addresses("a:1,b:2", 3)
    with pytest.raises(InvalidArgument, match="past 65535"):
        cohost.listen_addresses("h:65535", 2)


def test_one_metrics_port_becomes_one_per_cpu() -> None:
    assert cohost.metrics_ports("0", 2) == [0, 0]
    assert cohost.metrics_ports("-1", 2) == [-1, -1]
    assert cohost.metrics_ports(9100, 3) == [9100, 9101, 9102]
    assert cohost.metrics_ports("9100,9200", 2) == [9100, 9200]
    for bad, words in (("x", "not a port"), ("70000", "a port 1..65535"),
                       ("1,2,3", "3 values for 2")):
        with pytest.raises(InvalidArgument, match=words):
            cohost.metrics_ports(bad, 2)


def test_advertise_a_host_for_all_or_an_address_each() -> None:
    assert cohost.advertise_addresses(None, 2) == [None, None]
    assert cohost.advertise_addresses("cpus", 2) == ["cpus", "cpus"]
    assert cohost.advertise_addresses("a:1,b:2", 2) == ["a:1", "b:2"]
    assert cohost.advertise_addresses("cpu0:50051", 1) == ["cpu0:50051"]
    with pytest.raises(InvalidArgument, match="one HOST:PORT for 2 CPUs"):
        cohost.advertise_addresses("cpu0:50051", 2)


def test_the_state_file_says_which_process_hosts_which_cpus(tmp_path: Path) -> None:
    info = ClusterInfo("c:1", "m:2", {i: f"h:{10 + i}" for i in range(5)}, {},
                       {"coordinator": 1, "memory": 2, "cpus0-3": 3, "cpu4": 4}, tmp_path,
                       hosts={"cpus0-3": [0, 1, 2, 3]})
    again = ClusterInfo.from_json(info.to_json())
    assert again == info
    assert [again.process_of(i) for i in range(5)] == ["cpus0-3"] * 4 + ["cpu4"]
    assert again.cpus_of("cpus0-3") == [0, 1, 2, 3] and again.cpus_of("cpu4") == [4]
    assert again.cpus_of("memory") == [] and again.cpus_of("cpu9") == []
    assert again.process_running("cpu2") == "cpus0-3"
    assert again.process_running("cpu4") == "cpu4" and again.process_running("memory") == \
        "memory"


def test_a_state_file_from_before_has_one_process_per_cpu(tmp_path: Path) -> None:
    info = ClusterInfo("c:1", "m:2", {0: "h:1", 1: "h:2"}, {}, {"cpu0": 5, "cpu1": 6},
                       tmp_path)
    text = info.to_json().replace('"hosts": {}', '"unused": 0')
    assert '"hosts"' not in text
    old = ClusterInfo.from_json(text)
    assert old.hosts == {} and old.process_of(1) == "cpu1"
