"""The test cluster stops what it started and nothing else: `ray stop --force` would also kill a
Ray cluster the user runs beside the tests (or another checkout's test session)."""

from __future__ import annotations

import subprocess

import psutil
from local_cluster import Cluster


def test_stop_ends_this_clusters_processes_and_spares_a_bystander(tmp_path):
    cluster = Cluster(tmp_path)
    # Looks like one of Ray's processes to `ray stop` (it matches command lines like this one).
    bystander = subprocess.Popen(["bash", "-c", "exec -a log_monitor.py sleep 300"], start_new_session=True)
    try:
        cluster.start()
        own = cluster.own_processes()
        assert len(own) >= 3 and any("gcs_server" in p.name() for p in own)  # the head's daemons, at least
        cluster.stop()
        assert [p.pid for p in own if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
        assert [p for p in cluster.own_processes() if p.status() != psutil.STATUS_ZOMBIE] == []
        assert bystander.poll() is None, "stopping the test cluster killed a process that was not its own"
    finally:
        cluster.stop()
        bystander.kill()
        bystander.wait()
