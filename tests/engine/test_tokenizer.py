"""Tests for the offline rebuild of the Qwen2.5-Omni tokenizer."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from omnitalk.engine.tiny.tokenizer import CHAT_TEMPLATE, build_tokenizer, load_ranks

ADDED_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|AUDIO|>": 151646,
    "<|audio_bos|>": 151647,
    "<|audio_eos|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_bos|>": 151652,
    "<|vision_eos|>": 151653,
    "<|vision_pad|>": 151654,
    "<|IMAGE|>": 151655,
    "<|VIDEO|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"}
NOT_SPECIAL |= {"<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
NAMED_TOKENS = {
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}
MIXED_TEXTS = [
    "Hello, world! It's 2025; we'LL see.",
    "你好，世界！今天天气很好。",
    "日本語のテキストと한국어 텍스트, и немного русского.",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ 🤖",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n\nprint(f(12))\r\n",
    'if (a && b) { return {"key": [1, 2, 3]}; }',
    "spaces:     five, tabs:\t\t\ttwo, newlines:\n\n\n, trailing   ",
    "   leading spaces and \u00a0nbsp\u3000ideographic space",
    "digits 0123456789 3.14159 1,000,000 ０１２ ²³ ٣٤٥",
    "café naïve résumé Ångström — «quotes» “curly” ‘single’ …",
    "\x00\x01\x7f control bytes and zero\u200bwidth\ufeffbom",
    "",
]
WORDS = ["the", " The", " quick", " brown", " fox", "'s", "'T", " don't", " I'M", " we've"]
SCRIPTS = ["中文", "汉字测试", "。", "，", "日本", "カタカナ", "한국", "Привет", "مرحبا", "नमस्ते", "สวัสดี"]
SYMBOLS = ["😀", "👍🏽", "👩‍💻", "🇫🇷", "✨", "\u0301", "e\u0301", "Å", "ﬁ"]
SPACES = [" ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000"]
NUMBERS = ["0", "7", "42", "123456", "3.5", "1e-9", "０", "²", "٣"]
PUNCTUATION = ["(", ")", "{", "}", "[]", "==", "->", "!=", "...", "!!", "?", "#", "//", "/*", "*/", "`", "\\"]
CODE = ["def ", "return ", "print(", "import numpy as np", "<div>", "</div>", "&amp;", "http://x.y/z?q=1"]
FRAGMENTS = WORDS + SCRIPTS + SYMBOLS + SPACES + NUMBERS + PUNCTUATION + CODE


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved_dirs(tokenizer: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    dirs = [tmp_path_factory.mktemp("tok_a"), tmp_path_factory.mktemp("tok_b")]
    tokenizer.save_pretrained(dirs[0])
    build_tokenizer().save_pretrained(dirs[1])
    return dirs


def random_texts(count: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        pieces = rng.choices(FRAGMENTS, k=rng.randint(1, 20))
        # Arbitrary BMP and astral code points (surrogates excluded) reach rare byte sequences.
        pieces += [chr(rng.randint(0x20, 0xD7FF)), chr(rng.randint(0x10000, 0x1FAFF))]
        rng.shuffle(pieces)
        texts.append("".join(pieces))
    return texts


def ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_known_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.is_fast
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tokenizer.encode("你好") == [108386]


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_round_trip_mixed_text(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_random_text(tokenizer: PreTrainedTokenizerBase) -> None:
    # The pipeline normalizes to NFC, so only NFC input can come back unchanged.
    texts = [unicodedata.normalize("NFC", text) for text in random_texts(300)]
    assert tokenizer.batch_decode(ids(tokenizer, texts)) == texts


def test_added_tokens_at_real_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    decoder = tokenizer.added_tokens_decoder
    assert {token.content: token_id for token_id, token in decoder.items()} == ADDED_TOKENS
    for content, token_id in ADDED_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(content) == token_id
        assert tokenizer.encode(content) == [token_id]
        assert tokenizer.encode(f"a{content}b") == [64, token_id, 65]
        assert decoder[token_id].special == (content not in NOT_SPECIAL)
        assert not decoder[token_id].normalized


def test_named_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert tokenizer.unk_token is None
    assert tokenizer.model_max_length == 32768
    for attribute, content in NAMED_TOKENS.items():
        assert getattr(tokenizer, attribute) == content
        assert getattr(tokenizer, f"{attribute}_id") == ADDED_TOKENS[content]


def test_vocab_and_merges_sizes(tokenizer: PreTrainedTokenizerBase) -> None:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    assert len(model["vocab"]) == tokenizer.vocab_size == 151643
    assert len(model["merges"]) == 151387
    assert model["merges"][:3] == [["Ġ", "Ġ"], ["ĠĠ", "ĠĠ"], ["i", "n"]]
    assert not model["ignore_merges"]
    assert len(tokenizer) == 151665


def test_ids_without_token_decode_to_nothing(tokenizer: PreTrainedTokenizerBase) -> None:
    # The model's embedding has 152064 rows; 151665 and up have no token string.
    assert tokenizer.decode([151665]) == ""
    assert tokenizer.decode([9707, 152063]) == "Hello"


def test_matches_tiktoken_reference(tokenizer: PreTrainedTokenizerBase) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    from dashscope.tokenizers.qwen_tokenizer import PAT_STR  # Qwen's own split pattern

    reference = tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=load_ranks(), special_tokens={})
    texts = random_texts(400, seed=99) + MIXED_TEXTS
    expected = [reference.encode_ordinary(unicodedata.normalize("NFC", text)) for text in texts]
    assert ids(tokenizer, texts) == expected


def test_save_is_byte_deterministic(saved_dirs: list[Path]) -> None:
    first, second = saved_dirs
    names = sorted(path.name for path in first.iterdir())
    assert names == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert names == sorted(path.name for path in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_reloads_with_auto_tokenizer(tokenizer: PreTrainedTokenizerBase, saved_dirs: list[Path]) -> None:
    reloaded = AutoTokenizer.from_pretrained(saved_dirs[0])
    texts = MIXED_TEXTS + random_texts(50, seed=7) + list(ADDED_TOKENS)
    assert ids(reloaded, texts) == ids(tokenizer, texts)
    assert reloaded.added_tokens_decoder == tokenizer.added_tokens_decoder
    assert reloaded.chat_template == CHAT_TEMPLATE
    assert reloaded.eos_token == "<|im_end|>"
    assert reloaded.pad_token == "<|endoftext|>"
    assert reloaded.bos_token is None
    assert reloaded.model_max_length == 32768
    for attribute, content in NAMED_TOKENS.items():
        assert getattr(reloaded, attribute) == content
        assert getattr(reloaded, f"{attribute}_id") == ADDED_TOKENS[content]


def test_omni_processor_reads_named_tokens(saved_dirs: list[Path]) -> None:
    pytest.importorskip("torchvision")
    from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    reloaded = AutoTokenizer.from_pretrained(saved_dirs[0])
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=WhisperFeatureExtractor(),
        tokenizer=reloaded,
        chat_template=reloaded.chat_template,
    )
    for attribute, content in NAMED_TOKENS.items():
        assert getattr(processor, attribute) == content


def test_chat_template_text_image_audio(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image", "image": "cat.png"},
                {"type": "audio", "audio": "meow.wav"},
            ],
        }
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is in these?"
        "<|vision_bos|><|IMAGE|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_system_video_and_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "video", "video": "v.mp4"}, {"image_url": "a"}, {"image": "b"}],
        },
        {"role": "assistant", "content": "A dog."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_vision_id=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nVideo 1: <|vision_bos|><|VIDEO|><|vision_eos|>"
        "Picture 1: <|vision_bos|><|IMAGE|><|vision_eos|>"
        "Picture 2: <|vision_bos|><|IMAGE|><|vision_eos|><|im_end|>\n"
        "<|im_start|>assistant\nA dog.<|im_end|>\n"
    )
