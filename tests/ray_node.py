"""`ray start` pinned to 127.0.0.1, for the tests' own clusters.

Ray 2.60 replaces a loopback --node-ip-address (and a 127.0.0.1 address given to `ray.init`) with
the address of the interface its default route leaves by, so a cluster started with
`--node-ip-address 127.0.0.1` still listens and connects on the machine's network address. The
tests must send nothing there: this runs the `ray` command with the node address answered as
127.0.0.1, and `RAY_ENV` makes every process Ray starts (and the driver) answer the same.
"""

from __future__ import annotations

import sys

LOOPBACK = "127.0.0.1"
# Ray's switch for single-machine clusters (on by default on macOS/Windows): its processes then
# take the loopback address as the node's.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def main() -> None:
    import ray._private.ray_constants as constants
    import ray._private.services as services

    constants.ENABLE_RAY_CLUSTER = True  # this process may join a head (its children keep RAY_ENV)
    services.get_node_ip_address = lambda address=None: LOOPBACK  # type: ignore[assignment]
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *sys.argv[1:]]
    ray_main()


if __name__ == "__main__":
    main()
