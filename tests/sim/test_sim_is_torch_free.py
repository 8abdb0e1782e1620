import subprocess
import sys


def test_simulator_never_imports_torch():
    # A fresh interpreter runs a whole simulation; torch must not be among the modules it loaded.
    code = (
        "import sys\n"
        "import pdlab.sim, pdlab.sim.cost, pdlab.sim.links, pdlab.sim.instance, pdlab.sim.cluster, pdlab.sim.simulation\n"
        "import pdlab.sim.search, pdlab.sim.profile_cost, pdlab.sim.router, pdlab.sim.models, pdlab.sim.fit\n"
        "import pdlab.placement\n"
        "from pdlab.models.presets import PRESETS\n"
        "from pdlab.policy.scheduler import SchedulerConfig\n"
        "from pdlab.sim import InstanceSpec, Layout, RooflineCost, simulate\n"
        "from pdlab.workload.workload import RequestSpec\n"
        "layout = Layout(InstanceSpec(SchedulerConfig(), 100), mode='disaggregated', kv_bytes_per_token=1e5)\n"
        "simulate([RequestSpec('a', 0.0, (5,) * 10, 3)], layout, RooflineCost(PRESETS['llama3-8b']))\n"
        "from dataclasses import replace\n"
        "simulate([RequestSpec('a', 0.0, (5,) * 10, 3)], replace(layout, routing='splitwise', dispatch=None,\n"
        "         heartbeat_s=0.1), pdlab.sim.models.sim_model('ernie-4.5-300b-a47b').cost(tp=8, weight_bits=4))\n"
        "assert pdlab.placement.main(['--num-gpus', '1', '--tp', '1', '--num-requests', '5', '--ttft-ms', '500',\n"
        "                             '--tpot-ms', '50', '--no-progress']) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
