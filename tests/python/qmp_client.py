"""Drives a running zapvm VM with QEMU's own QMP client library, qemu.qmp, as a QEMU user would.

Usage: qmp_client.py SOCKET

Connects (greeting and capabilities negotiation are the library's), then: sets the balloon and
waits for the guest's BALLOON_CHANGE event and for query-balloon to show the new size; resizes
virtio-mem with qom-set and waits for MEMORY_DEVICE_SIZE_CHANGE; reads KVM's statistics with
query-stats and query-stats-schemas; stops and continues the VM (STOP and RESUME events, and
query-status in between); sends an unknown command; quits (SHUTDOWN). Every event is received
asynchronously by the library's event listener while commands run. Prints one JSON object with
what it saw; exits non-zero with the reason on the first failure.
"""

import asyncio
import json
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient

MIB = 1 << 20


async def next_event(listener, name, timeout=60.0):
    """The next event called `name` (others are kept in `seen`)."""
    while True:
        event = await asyncio.wait_for(listener.get(), timeout)
        SEEN.append(event["event"])
        if event["event"] == name:
            return event


SEEN = []


async def main(socket):
    out = {}
    qmp = QMPClient("zapvm-test")
    listener = EventListener()
    qmp.register_listener(listener)
    await asyncio.wait_for(qmp.connect(socket), 30)
    out["greeting_package"] = qmp.greeting.QMP.version["package"]

    out["status"] = await qmp.execute("query-status")
    summary = await qmp.execute("query-memory-size-summary")
    base = summary["base-memory"]
    out["base_memory"] = base

    # The balloon takes 64 MiB: the guest keeps base - 64 MiB.
    await qmp.execute("balloon", {"value": base - 64 * MIB})
    while True:
        change = await next_event(listener, "BALLOON_CHANGE")
        if change["data"]["actual"] == base - 64 * MIB:
            break
    out["balloon_change"] = change["data"]
    out["balloon_timestamp"] = change["timestamp"]
    out["query_balloon"] = await qmp.execute("query-balloon")

    # virtio-mem: ask for 32 MiB, the guest's driver plugs it.
    await qmp.execute(
        "qom-set", {"path": "/machine/peripheral/vmem0", "property": "requested-size", "value": 32 * MIB}
    )
    while True:
        change = await next_event(listener, "MEMORY_DEVICE_SIZE_CHANGE")
        if change["data"]["size"] == 32 * MIB:
            break
    out["memory_device_change"] = change["data"]
    out["memory_devices"] = await qmp.execute("query-memory-devices")

    out["stats_vm"] = await qmp.execute("query-stats", {"target": "vm"})
    out["stats_vcpu"] = await qmp.execute(
        "query-stats", {"target": "vcpu", "providers": [{"provider": "kvm", "names": ["exits"]}]}
    )
    out["schemas"] = await qmp.execute("query-stats-schemas")
    out["guest_stats"] = await qmp.execute(
        "qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"}
    )

    await qmp.execute("stop")
    await next_event(listener, "STOP")
    out["paused_status"] = await qmp.execute("query-status")
    await qmp.execute("cont")
    await next_event(listener, "RESUME")

    try:
        await qmp.execute("frobnicate")
        out["unknown_command"] = "accepted"
    except ExecuteError as e:
        out["unknown_command"] = e.error_class

    await qmp.execute("quit")
    shutdown = await next_event(listener, "SHUTDOWN")
    out["shutdown"] = shutdown["data"]
    out["events_seen"] = SEEN
    await qmp.disconnect()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
