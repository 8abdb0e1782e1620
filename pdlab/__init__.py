"""pdlab: a testbed for prefill/decode disaggregated LLM serving."""

from pdlab.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch; import it only when asked so that policy code stays torch-free.
    if name == "LLM":
        from pdlab.engine.llm import LLM

        return LLM
    raise AttributeError(name)
