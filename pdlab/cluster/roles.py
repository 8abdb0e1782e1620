"""The roles an instance can take, by FastDeploy's `--splitwise-role` names."""

from __future__ import annotations

from pdlab.cluster.decode import Decode
from pdlab.cluster.frontend import Mixed
from pdlab.cluster.prefill import Prefill

ROLES = {"mixed": Mixed, "prefill": Prefill, "decode": Decode}
