"""Run a tlbsim cluster on this machine as real processes.

    processes.py   LocalCluster: start, watch, kill, restart and stop the services
    state.py       ClusterInfo and the state file of a detached cluster; pids
    brokers.py     the MQTT broker of `up --mqtt`
    errors.py      LauncherError (no cluster) and UsageError (a bad option or state file)
    commands.py    `tlbsim up` and `tlbsim down`
"""
from services.launcher.brokers import (free_port, mosquitto_binary, mosquitto_config,
                                       wait_listening)
from services.launcher.errors import AlreadyRunning, LauncherError, UsageError
from services.launcher.processes import MAX_CPUS, LocalCluster
from services.launcher.state import (MOSQUITTO_CONF, ClusterInfo, is_alive, is_our_service,
                                     load_state, state_path, stop_pids, write_state)

__all__ = ["AlreadyRunning", "ClusterInfo", "LauncherError", "LocalCluster", "MAX_CPUS",
           "MOSQUITTO_CONF", "UsageError", "free_port", "is_alive", "is_our_service",
           "load_state", "mosquitto_binary", "mosquitto_config", "state_path", "stop_pids",
           "wait_listening", "write_state"]
