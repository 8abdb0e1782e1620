import subprocess
import sys

POLICY = ["pdlab.policy.scheduler", "pdlab.policy.block_manager", "pdlab.policy.request", "pdlab.policy.transfers",
          "pdlab.sampling_params"]


def test_policy_imports_only_the_standard_library():
    # A fresh interpreter: whatever the policy modules import shows up in sys.modules.
    code = (
        "import sys, importlib\n"
        "before = set(sys.modules)\n"
        f"for name in {POLICY!r}: importlib.import_module(name)\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(','.join(sorted(new - set(sys.stdlib_module_names) - {'pdlab'})))\n"
        "print('torch' in sys.modules)\n"
    )
    third, torch_loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[:2]
    assert third == "", f"policy modules pulled in third-party modules: {third}"
    assert torch_loaded == "False"
