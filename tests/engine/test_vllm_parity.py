"""vLLM serves the tiny checkpoint's thinker and its greedy tokens equal transformers'."""

from __future__ import annotations

import pytest

CONVERSATIONS = {
    "english": [{"role": "user", "content": "Hello, world! What can you hear?"}],
    "chinese-with-system": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "你好，请介绍一下你自己。"}]},
    ],
    "multi-turn": [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "Again, slower?"},
    ],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_greedy_text_tokens_equal_transformers(vllm_llm, reference, name):
    from vllm import SamplingParams

    conversation = CONVERSATIONS[name]
    expected = reference.generate(conversation, max_new_tokens=24, audio=False)
    output = vllm_llm.chat(conversation, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    assert list(output.prompt_token_ids) == expected.prompt_ids
    assert list(output.outputs[0].token_ids) == expected.thinker_tokens
