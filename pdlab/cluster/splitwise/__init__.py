"""FastDeploy's multi-machine mode: a global "splitwise" scheduler in Redis.

    python -m pdlab.entrypoints.openai.api_server --model llama3-8b --splitwise-role prefill \
        --port 8180 --engine-worker-queue-port 8182 --cache-queue-port 8183 \
        --cache-transfer-protocol "rdma,ipc" --scheduler-name splitwise \
        --scheduler-host 127.0.0.1 --scheduler-port 6379 --scheduler-ttl 9000

Every instance registers in Redis and heartbeats its role, load and endpoints
(`agent.py`). A request entering any instance becomes that instance's *route*
(`router.py`): the router picks a decode and a prefill instance (or a mixed
one) with the shared dispatch policy (`pdlab/policy/dispatch.py`, FastDeploy's
least-loaded-with-random-near-ties by default) and the transfer protocol of
the pair (ipc on one host, rdma when both offer it, else tcp), and pushes the
task to the decode instance's inbox. The decode instance reserves blocks,
sends the prefill task to the named prefill instance over zmq as in the
single-machine mode, and pushes each step's tokens to the router's results
list; the router streams them to its client.

Beyond FastDeploy, which leaves such requests to expire: when an instance a
route depends on stops heartbeating (or reports that a peer it needed was
lost), the router sends the request elsewhere with the tokens it has so far,
and the new instance goes on from there (greedy and seeded sampling give the
same tokens as an uninterrupted run).

Redis keys (`keys.py`; values are JSON written by msgspec, never pickle):

| key | type | holds |
|---|---|---|
| `{topic}.cluster` | hash | node id -> `NodeInfo` (role, load, endpoints, protocols, heartbeat time) |
| `{topic}.inbox.{node}` | list | `Task` / `TaskAbort` for a decode or mixed instance (LPUSH, RPOP) |
| `{topic}.results.{node}` | list | `RequestUpdate`s for the router of that node (LPUSH, RPOP) |

Lists expire `--scheduler-ttl` seconds after their last push; a node whose
heartbeat is older than `--scheduler-expire-s` is removed from the hash (with
its lists) by whichever live node notices first.
"""
