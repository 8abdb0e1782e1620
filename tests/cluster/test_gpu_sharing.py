"""Instances sharing a GPU: what the deployment passes each one (CPU), and MPS refusing to start where it cannot."""

from __future__ import annotations

import pytest

from pdlab.cluster import deployment, mps
from pdlab.cluster.deployment import Deployment
from pdlab.cluster.launch import InstanceProcess
from pdlab.cluster.mps import MpsDaemon, MpsError


def one_gpu(monkeypatch, count: int = 1) -> None:
    monkeypatch.setattr(deployment, "_num_gpus", lambda: count)


def flags(args: list[str]) -> dict[str, str]:
    return dict(zip(args[::2], args[1::2]))


def test_a_pair_on_one_gpu_gets_each_role_its_memory_share_and_sm_limit(monkeypatch):
    one_gpu(monkeypatch)
    d = Deployment("tiny", "disaggregated", gpu_sharing="mps", gpu_memory_utilization=0.8,
                   sm_percentage={"prefill": 60, "decode": 40}, memory_share={"decode": 0.5})
    envs = d.placement()
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "0"]  # the decode wraps around onto GPU 0
    prefill, decode = (flags(d.gpu_args(role, env, envs)) for (role, _), env in zip(d.roles, envs))
    assert prefill == {"--gpu-memory-utilization": "0.400", "--sm-percentage": "60"}  # 0.8 split over two
    assert decode == {"--gpu-memory-utilization": "0.5", "--sm-percentage": "40"}


def test_time_sliced_instances_get_no_sm_limit_and_instances_alone_keep_the_engines_share(monkeypatch):
    one_gpu(monkeypatch, count=2)
    d = Deployment("tiny", "disaggregated", gpu_sharing="time", sm_percentage={"prefill": 60})
    envs = d.placement()
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1"]
    assert all(d.gpu_args(role, env, envs) == [] for (role, _), env in zip(d.roles, envs))



def test_the_memory_share_is_a_field_that_instances_alone_get_whole(monkeypatch):
    one_gpu(monkeypatch, count=2)
    d = Deployment("tiny", "disaggregated", gpu_memory_utilization=0.7)
    envs = d.placement()
    assert all(d.gpu_args(role, env, envs) == ["--gpu-memory-utilization", "0.7"]
               for (role, _), env in zip(d.roles, envs))
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        Deployment("tiny", "colocated", ["--gpu-memory-utilization", "0.5"])

def test_the_decode_maps_the_weights_of_the_prefill_on_its_gpu_only(monkeypatch):
    one_gpu(monkeypatch)
    prefill = InstanceProcess("prefill", 9001, 9002, proc=None, log_path=None)
    other = InstanceProcess("prefill", 9003, 9004, proc=None, log_path=None)
    d = Deployment("tiny", "disaggregated")
    prefills = [(other, {"CUDA_VISIBLE_DEVICES": "1"}), (prefill, {"CUDA_VISIBLE_DEVICES": "0"})]
    assert d.weights_owner({"CUDA_VISIBLE_DEVICES": "0"}, 1, prefills) is prefill
    assert d.weights_owner({"CUDA_VISIBLE_DEVICES": "2"}, 1, prefills) is None  # no prefill on its GPU
    assert d.weights_owner({"CUDA_VISIBLE_DEVICES": "0"}, 2, prefills) is None  # tensor parallel: its own
    assert Deployment("tiny", "disaggregated", share_weights=False).weights_owner(
        {"CUDA_VISIBLE_DEVICES": "0"}, 1, prefills) is None
    assert Deployment("tiny", "disaggregated", protocol="tcp").weights_owner(
        {"CUDA_VISIBLE_DEVICES": "0"}, 1, prefills) is None
    assert d.weights_owner({"OMP_NUM_THREADS": "1"}, 1, prefills) is None  # CPU instances


def test_mps_without_a_gpu_is_one_clear_error_before_any_instance_starts(monkeypatch, tmp_path):
    one_gpu(monkeypatch, count=0)
    d = Deployment("tiny", "disaggregated", gpu_sharing="mps", log_dir=tmp_path)
    with pytest.raises(MpsError, match="needs a GPU"):
        d.start()
    assert d.instances == [] and not list(tmp_path.iterdir())


def test_mps_without_its_control_program_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(mps.shutil, "which", lambda name: None)
    with pytest.raises(MpsError, match="nvidia-cuda-mps-control on PATH"):
        MpsDaemon().start()


def test_a_daemon_that_fails_to_start_is_reported_with_its_reason_and_cleaned_up(monkeypatch, tmp_path):
    """A stand-in control program that refuses to start, as when another user's daemon holds the GPU."""
    fake = tmp_path / "nvidia-cuda-mps-control"
    fake.write_text("#!/bin/sh\necho 'An instance of this daemon is already running' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv(mps.PIPE_ENV, str(tmp_path / "no-daemon-here"))
    daemon = MpsDaemon()
    with pytest.raises(MpsError, match="already running"):
        daemon.start()
    assert not daemon.started and daemon._dir is None


def test_an_instance_without_gpu_weights_says_why_it_cannot_share_them_and_the_mapper_fails_in_one_line(cluster):
    """On CPUs: the offer carries the reason instead of handles, and a decode told to map it refuses to start."""
    import torch

    from pdlab.cluster.client import fetch_weights

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a CUDA GPU (on a GPU the weights are shared)")
    mixed = cluster.start("mixed", "tiny", ["--max-model-len", "128"])
    mixed.wait_ready(120)
    offer = fetch_weights(mixed.endpoint, timeout_s=10)
    assert offer is not None and offer.weights is None
    assert "cannot share its weights" in offer.error and "GPU" in offer.error
    mapper = cluster.start("decode", "tiny", ["--max-model-len", "128", "--weights-from",
                                              str(mixed.engine_worker_queue_port)])
    with pytest.raises(Exception, match=r"--weights-from \d+: .*cannot share its weights"):
        mapper.wait_ready(120)
    assert "Traceback" not in mapper.log_path.read_text()
