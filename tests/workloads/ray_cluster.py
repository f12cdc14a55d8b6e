"""A local Ray cluster of several nodes for kvprof's Ray tests (ray.cluster_utils.Cluster:
one raylet per node, on this machine), started outside any recording, as a real cluster
is.  Prints {"address", "nodes"} as one JSON line, then holds the cluster until its
standard input closes.

    python tests/workloads/ray_cluster.py NODES
"""

import json
import sys

from ray.cluster_utils import Cluster


def main() -> None:
    nodes = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ids = [n.node_id for n in [cluster.head_node, *cluster.worker_nodes]]
    print(json.dumps({"address": cluster.address, "nodes": ids}), flush=True)
    sys.stdin.read()  # held until the test closes our stdin
    cluster.shutdown()


if __name__ == "__main__":
    main()
