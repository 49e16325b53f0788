import pytest


@pytest.fixture(scope="session")
def model_dir():
    """The real model (SmolLM2-135M-Instruct, float32 HF folder), prepared once and cached."""
    from vllm_split.model_prep import prepare

    return prepare()
