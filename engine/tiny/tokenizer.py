"""The real Qwen2.5-Omni tokenizer, rebuilt offline from the Qwen BPE ranks that dashscope ships."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase, Qwen2Tokenizer

__all__ = ["CHAT_TEMPLATE", "build_tokenizer", "load_ranks", "recover_merges"]

# Ids 151643.. of Qwen2.5-Omni's added tokens, in id order. Ids 151665..152063 exist only as embedding
# rows (the model's vocab_size is 152064) and have no token string, so they are not added.
ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
FIRST_ADDED_ID = 151643
# Qwen marks only the control tokens up to <|VIDEO|> special; tool-call and FIM tokens are plain added tokens.
LAST_SPECIAL_ID = 151656
# What Qwen's tokenizer_config lists as additional special tokens: every special token but <|endoftext|>.
CONTROL_TOKENS: tuple[str, ...] = ADDED_TOKENS[1 : LAST_SPECIAL_ID - FIRST_ADDED_ID + 1]

# The named tokens Qwen2_5OmniProcessor reads off the tokenizer (`tokenizer.audio_token` etc.).
MULTIMODAL_TOKENS: dict[str, str] = {
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}

# Renders exactly what Qwen2.5-Omni's chat_template.json renders. Every literal is emitted from an
# expression and every tag trims the source whitespace before it, so the output does not depend on
# the Jinja environment's trim_blocks/lstrip_blocks. Video always renders as its own
# <|vision_bos|><|VIDEO|><|vision_eos|> block: with use_audio_in_video the *processor* interleaves the
# video's audio into that block, so the conversation must not carry a separate audio part for it.
CHAT_TEMPLATE = """\
{%- set counts = namespace(image=0, audio=0, video=0) %}
{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' ~ message['role'] ~ '\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part %}
                {%- set counts.image = counts.image + 1 %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ counts.image ~ ': ' }}
                {%- endif %}
                {{- '<|vision_bos|><|IMAGE|><|vision_eos|>' }}
            {%- elif part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}
                {%- set counts.audio = counts.audio + 1 %}
                {%- if add_audio_id %}
                    {{- 'Audio ' ~ counts.audio ~ ': ' }}
                {%- endif %}
                {{- '<|audio_bos|><|AUDIO|><|audio_eos|>' }}
            {%- elif part['type'] == 'video' or 'video' in part %}
                {%- set counts.video = counts.video + 1 %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ counts.video ~ ': ' }}
                {%- endif %}
                {{- '<|vision_bos|><|VIDEO|><|vision_eos|>' }}
            {%- elif 'text' in part %}
                {{- part['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""


def _ranks_file() -> Path:
    # find_spec locates the installed package without importing it (importing dashscope costs ~1 s).
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("dashscope is not installed; it ships qwen.tiktoken")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


def load_ranks() -> dict[bytes, int]:
    """Qwen's byte-level BPE ranks (token bytes -> rank, which is also the token id)."""
    ranks: dict[bytes, int] = {}
    for line in _ranks_file().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Replay BPE over the token's bytes using only lower ranks; the two parts left are its merge."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_index = rank, -1
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1], rank)
            if pair_rank < best_rank:
                best_rank, best_index = pair_rank, i
        if best_index < 0:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by lower-rank merges")
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts[0], parts[1]


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merge list, in priority order (rank of the token each merge produces)."""
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    return [_last_merge(token, rank, ranks) for token, rank in by_rank if len(token) > 1]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    # Bytes that are printable Latin-1 characters ("!".."~", "¡".."¬", "®".."ÿ") map to themselves.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _added_tokens() -> dict[int, AddedToken]:
    return {
        token_id: AddedToken(content, special=token_id <= LAST_SPECIAL_ID, normalized=False)
        for token_id, content in enumerate(ADDED_TOKENS, start=FIRST_ADDED_ID)
    }


def build_tokenizer() -> PreTrainedTokenizerBase:
    """The Qwen2.5-Omni tokenizer (fast, Qwen2 pipeline), with every special token at its real id and the
    Omni chat template."""
    ranks = load_ranks()
    byte_char = _bytes_to_unicode()

    def to_unicode(token: bytes) -> str:
        return "".join(byte_char[byte] for byte in token)

    vocab = {to_unicode(token): rank for token, rank in ranks.items()}
    merges = [(to_unicode(left), to_unicode(right)) for left, right in recover_merges(ranks)]
    # Qwen2Tokenizer itself sets up the Qwen2 pipeline: NFC, Qwen2's split regex (single digits), byte-level.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        added_tokens_decoder=_added_tokens(),
        extra_special_tokens=list(CONTROL_TOKENS),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        add_prefix_space=False,
        errors="replace",
        model_max_length=32768,
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        **MULTIMODAL_TOKENS,
    )
    _check_added_ids(tokenizer)
    return tokenizer


def _check_added_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    # Added tokens take the next free id in insertion order, so a change upstream could shift them silently.
    actual = {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items()}
    expected = {content: token_id for token_id, content in enumerate(ADDED_TOKENS, start=FIRST_ADDED_ID)}
    if actual != expected:
        raise RuntimeError(f"added tokens landed at the wrong ids: {actual}")
