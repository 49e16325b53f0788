"""Client-library test fixtures: a tiny random Llama with a tiny byte-level BPE tokenizer and a
chat template, written by the tests (no model hub)."""
from __future__ import annotations

import pytest
import torch

NUM_LAYERS, HIDDEN, VOCAB = 4, 16, 320
CORPUS = ["Hello world! The answer is 42. END of story.", "café ☕ naïve", "The quick brown fox jumps over the lazy dog.",
          "user assistant system", "What is the capital of France? Paris is the capital of France."]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_chat_model(path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    build_tiny_chat_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)
