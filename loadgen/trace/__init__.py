"""Traces of real programs: record them (`tlbsim trace record`), replay them on a cluster
(`tlbsim load replay`, or `tlbsim load compare TRACE`).

The trace file (`*.tlbt.gz`) is gzip-compressed JSON Lines, one object per line:

- line 1, the header: `{"format": "tlbsim-trace", "version": 1, "source": "strace" |
  "valgrind-lackey", "command": [...], "recorded": ISO time, "tool": "strace -- version
  6.1", "page_size": 4096, "exit_status": N, "syscalls": {name: calls seen, failed ones
  included}, "unknown_syscalls": {name: calls}, "signals": N, "events": N, "access_pages":
  N}` — plus, for a valgrind trace, `"strace_syscalls"`: what strace saw in a native run.
- every further line, one event of one task (`tid`, the kernel's thread id; `t`, seconds
  since the first event, when the source has times). `op` is one of:
  - `mmap` `{addr, len, prot, flags, fd, ret | err}` — `prot`/`flags` as strace spells them
  - `munmap` `{addr, len, ret | err}`; `mprotect` `{addr, len, prot, ret | err}`
  - `madvise` `{addr, len, advice, ret | err}`; `brk` `{addr, ret | err}`
  - `mremap` `{addr, old_len, new_len, flags, new_addr?, ret | err}`
  - `clone` `{call: clone | clone3 | fork | vfork, flags, ret (the child's tid) | err}`
  - `execve` `{call: execve | execveat, path, ret | err}`
  - `exit` `{call: exit | exit_group}`: the task (exit) or its thread group (exit_group) ends
  - `end` `{status}`: strace saw the task end (`+++ exited with N +++` / `+++ killed by`)
  - `access` `{pages: [[page number, 1 if written else 0], ...]}` — valgrind lackey's data
    accesses in order, consecutive accesses to the same page collapsed into one
  `err` is the errno name of a failed call (the kernel changed nothing; replay skips it).

Reading is strict: a line that is not such an object is an error naming its line number.
"""
