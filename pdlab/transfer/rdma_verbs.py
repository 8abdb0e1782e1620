"""pyverbs plumbing of the rdma transport (rdma_sender.py, rdma_receiver.py): an opened NIC with its protection
domain, memory registration, and RC queue pairs moved INIT -> RTR -> RTS. pyverbs is optional: without it
this imports, `PyverbsError` is an empty tuple, and `require_pyverbs` says why the transport cannot start.
"""

from __future__ import annotations

import errno
import logging
import os
import random

import torch

from pdlab.transfer.base import TransferError
from pdlab.transfer.rdma_setup import IB_PORT, QpEndpoint, keep_root_logging, select_nic

log = logging.getLogger("pdlab.transfer.rdma")

try:  # optional: pyverbs ships with the host's rdma-core; `rdma_status` explains its absence
    with keep_root_logging():
        import pyverbs.enums as e
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.cq import CQ, cqe_status_to_str  # noqa: F401  (the sender's, through rdma_sender.py)
        from pyverbs.device import Context
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.pyverbs_error import PyverbsError
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
        from pyverbs.wr import SGE, SendWR  # noqa: F401  (the sender's)
except ImportError:
    PyverbsError = ()  # nothing to catch

ENV_GID_INDEX = "KVCACHE_RDMA_GID_INDEX"  # RoCE only; FastDeploy's default is 3 (RoCEv2, IPv4 on mlx5)


def gid_index() -> int:
    text = os.environ.get(ENV_GID_INDEX, "3")
    if not text.isdigit():
        raise TransferError(f"{ENV_GID_INDEX}={text!r} is not a GID table index")
    return int(text)


class Nic:
    """An opened RDMA device with its protection domain."""

    def __init__(self, nics: str | None, gpu_index: int) -> None:
        self.name = select_nic(nics, gpu_index)
        try:
            self.ctx = Context(name=self.name)
        except PyverbsError as err:
            raise TransferError(f"cannot open RDMA device {self.name}: {err}") from None
        try:
            self.pd = PD(self.ctx)
            self.port = self.ctx.query_port(IB_PORT)
            self.device = self.ctx.query_device()
            self.roce = self.port.link_layer == e.IBV_LINK_LAYER_ETHERNET
            self.gid_index = gid_index() if self.roce else 0  # InfiniBand routes by LID
            self.gid = str(self.ctx.query_gid(IB_PORT, self.gid_index))
            if self.roce and set(self.gid) <= {"0", ":"}:
                raise TransferError(f"GID {self.gid_index} of port {IB_PORT} is empty (RoCE needs one; "
                                    f"set {ENV_GID_INDEX}, see `show_gids`)")
        except (PyverbsError, TransferError) as err:
            self.ctx.close()
            raise TransferError(f"RDMA device {self.name}: {err}") from None

    def register(self, tensor: torch.Tensor, access: int) -> MR:
        num_bytes = tensor.numel() * tensor.element_size()
        try:
            return MR(self.pd, num_bytes, access, address=tensor.data_ptr())  # registers; allocates nothing
        except PyverbsError as err:
            pinning_refused = getattr(err, "error_code", 0) == errno.ENOMEM
            hint = " (the locked-memory limit? `ulimit -l unlimited`)" if pinning_refused else ""
            raise TransferError(f"cannot register {num_bytes} bytes of {tensor.device} memory with {self.name}: "
                                f"{err}{hint}") from None

    def register_cache(self, kv: torch.Tensor, access: int, gpudirect: bool) -> MR | None:
        """The KV cache's own registration; None for CUDA memory without GPUDirect RDMA (stage it)."""
        if not kv.is_cuda:
            return self.register(kv, access)
        if not gpudirect:
            return None
        try:
            return self.register(kv, access)
        except TransferError as err:
            log.info("%s; staging KV through pinned host memory", err)
            return None

    def create_qp(self, cq: CQ, max_send_wr: int, access: int) -> tuple[QP, int]:
        """An RC QP in INIT, whose send WRs signal only when asked; and a random start PSN."""
        cap = QPCap(max_send_wr=max_send_wr, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=0)
        attr = QPAttr(port_num=IB_PORT)
        attr.qp_access_flags = access
        return QP(self.pd, init, attr), random.getrandbits(24)  # QP(pd, init, attr) moves an RC QP to INIT

    def endpoint(self, qp: QP, psn: int) -> QpEndpoint:
        return QpEndpoint(qp.qp_num, psn, self.gid, self.port.lid, self.port.active_mtu)

    def connect(self, qp: QP, me: QpEndpoint, peer: QpEndpoint) -> None:
        """INIT -> RTR -> RTS towards `peer` (the attributes of ibv_rc_pingpong and rdma-core's tests)."""
        attr = QPAttr(port_num=IB_PORT, path_mtu=min(me.mtu, peer.mtu))
        attr.dest_qp_num, attr.rq_psn, attr.sq_psn = peer.qp_num, peer.psn, me.psn
        attr.max_dest_rd_atomic = attr.max_rd_atomic = 1
        attr.min_rnr_timer, attr.timeout, attr.retry_cnt, attr.rnr_retry = 12, 14, 7, 7
        if self.roce:  # RoCE addresses by GID, through a global route header
            gr = GlobalRoute(dgid=GID(peer.gid), sgid_index=self.gid_index, hop_limit=255)  # routed RoCEv2
            attr.ah_attr = AHAttr(port_num=IB_PORT, is_global=1, gr=gr)
        else:
            attr.ah_attr = AHAttr(port_num=IB_PORT, dlid=peer.lid)
        qp.to_rts(attr)  # pyverbs: to_rtr (RTR mask) then RTS (RTS mask), from the same QPAttr

    def close(self) -> None:
        self.ctx.close()  # closes the PD, MRs, CQs and QPs opened on it


def device_index(tensor: torch.Tensor, gpu_index: int | None) -> int:
    if gpu_index is not None:
        return gpu_index
    return (tensor.device.index or 0) if tensor.is_cuda else 0


def require_pyverbs(nics: str | None, gpu_index: int) -> None:
    if not isinstance(PyverbsError, type):
        select_nic(nics, gpu_index)  # raises, saying why
        raise TransferError("pyverbs did not import when pdlab.transfer.rdma_verbs was first imported")
