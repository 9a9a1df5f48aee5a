"""Admin calls: the RPCs that change a whole service's configuration or state
(reset a run, inject faults). When a shared token is configured (always when a
service listens beyond loopback) they need it; see security.py and server.py."""
from __future__ import annotations

# Full gRPC method names ("/package.Service/Method"). tests/fuzz/test_admin_methods.py
# fails if an RPC whose name says it resets, reconfigures or injects chaos is missing.
ADMIN_METHODS = frozenset({
    "/tlbsim.v1.CpuService/Reset",
    "/tlbsim.v1.MemoryService/Reset",
    "/tlbsim.v1.CoordinatorService/Reset",
    "/tlbsim.v1.CpuService/Chaos",  # fault injection (services/common/chaos.py)
})
