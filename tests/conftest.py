import pytest
import torch

# The tests run the client library in this process, on the same two cores as the vLLM CPU
# server, whose worker pins a core: more than one client thread makes OpenMP threads wait
# on each other behind it (a client step then takes ~40x longer). One thread avoids that.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_dir():
    """The real model (SmolLM2-135M-Instruct, float32 HF folder), prepared once and cached."""
    from harness.model_prep import prepare

    return prepare()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
