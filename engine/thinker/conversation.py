"""A Realtime session's thinker state between turns: vLLM's prefix cache keeps the KV, this module the rows.

Every turn re-sends the whole conversation. A session's spoken requests share one `cache_salt` (the session's
key), so vLLM's prefix cache serves the positions an earlier turn computed; those positions are never
recomputed, so the tap sends no row for them. `SessionRows` keeps, for the session's last request, every
position's content key and the hidden-state row the stream gave it, and hands the rows of a shared prefix to the
next request. A content key is a hash chain over the token id and the identity of the multimodal item covering the
position (vLLM's own item hash and the offset in it), so equal keys mean equal prefixes: a truncated answer or a
deleted item changes the keys from the first position it changes, and only the rows before it are reused.

Earlier turns' audio must reach vLLM exactly as it did the first time, or its item hash (and with it every later
block's) changes: the processor's kwargs enter that hash, and omnitalk pads each clip to the request's longest.
`session_prompt` therefore sends a session's audio as precomputed features (`features.clip_features`), split into
the items `features.split_blocks` gives, each hashed by its own data.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from omnitalk.engine.thinker.events import HiddenStates, ThinkerEvent, ThinkerText
from omnitalk.engine.thinker.features import BLOCK_FRAMES, clip_features, split_blocks

AUDIO_PLACEHOLDER = "<|AUDIO|>"
# The processor kwargs of every request or chunk that sends block items: vLLM hashes an item with them, so an item
# sent in a streaming-input chunk and in a later turn's request is the same item only if both carry the same.
BLOCK_ITEM_KWARGS = {"use_audio_in_video": False}


def features_audio(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """vLLM's audio input for feature items [num_mels, frames <= BLOCK_FRAMES]: the features side by side, their
    lengths, and a mask row per item padded to one block, so that an item's data (and vLLM's hash of it) does not
    depend on the other items of the request."""
    lengths = [item.shape[1] for item in items]
    mask = torch.zeros((len(items), BLOCK_FRAMES), dtype=torch.long)
    for k, frames in enumerate(lengths):
        mask[k, :frames] = 1
    return {
        "input_audio_features": torch.cat(items, dim=1).contiguous(),
        "audio_feature_lengths": torch.tensor(lengths),
        "feature_attention_mask": mask,
    }


class ClipItems:
    """A session's clips as block items, each computed once: a Realtime item's samples array comes back, the same
    object, in every later turn (features of 200 s of audio take about half a second on a loaded 2-core CPU)."""

    def __init__(self, num_mels: int) -> None:
        self.num_mels = num_mels
        self._items: dict[int, tuple[weakref.ref, list[torch.Tensor]]] = {}

    def __call__(self, samples: np.ndarray) -> list[torch.Tensor]:
        entry = self._items.get(id(samples))
        if entry is not None and entry[0]() is samples:
            return entry[1]
        items = split_blocks(clip_features(samples, self.num_mels))
        self.put(samples, items)
        return items

    def put(self, samples: np.ndarray, items: list[torch.Tensor]) -> None:
        """`samples`' items are `items` (an ingested turn's: the very tensors its chunks sent)."""
        self._items = {k: v for k, v in self._items.items() if v[0]() is not None}  # clips no item holds any more
        self._items[id(samples)] = (weakref.ref(samples), items)


def session_prompt(prompt: dict[str, Any], clip_items: ClipItems, audio_token: int) -> dict[str, Any]:
    """`prompt` (from `build_prompt`, audio as samples) with every clip sent as its block items instead: each clip's
    one `<|AUDIO|>` becomes one per item. The prompt stays as it is when it holds images or videos (vLLM's
    processor, run on those, would find the audio placeholders without their audio) or a clip too short for one
    audio token (which fails in vLLM as it would have)."""
    media = prompt.get("multi_modal_data", {})
    clips = [samples for samples, _ in media.get("audio", [])]
    if not clips or set(media) != {"audio"}:
        return prompt
    per_clip = [clip_items(samples) for samples in clips]
    if any(not items for items in per_clip):
        return prompt
    counts = iter([len(items) for items in per_clip])
    result = dict(prompt)
    if "prompt" in prompt:
        pieces = prompt["prompt"].split(AUDIO_PLACEHOLDER)
        result["prompt"] = pieces[0] + "".join(AUDIO_PLACEHOLDER * next(counts) + piece for piece in pieces[1:])
    else:
        ids = prompt["prompt_token_ids"]
        result["prompt_token_ids"] = [t for i in ids for t in ([i] * next(counts) if i == audio_token else [i])]
    media = dict(prompt["multi_modal_data"])
    media["audio"] = features_audio([item for items in per_clip for item in items])
    result["multi_modal_data"] = media
    result["mm_processor_kwargs"] = dict(BLOCK_ITEM_KWARGS)
    return result


def content_keys(token_ids: list[int], mm_features: list[Any] | None = None, keys: list[bytes] | None = None):
    """One key per position: the hash of the previous key, the token id and, inside a multimodal item, the item's
    identifier and the offset in it (`mm_features`: vLLM's `MultiModalFeatureSpec`s of the prompt). With `keys`,
    the prompt continues them (a streaming-input chunk: its positions and item offsets start at len(keys))."""
    base = len(keys or ())
    covering: dict[int, tuple[str, int]] = {}
    for feature in mm_features or ():
        start, length = base + feature.mm_position.offset, feature.mm_position.length
        covering |= {start + k: (feature.identifier, k) for k in range(length)}
    return extend_keys(list(keys or ()), token_ids, covering)


def extend_keys(keys: list[bytes], token_ids: list[int], covering: dict[int, tuple[str, int]] | None = None):
    """`keys` continued by `token_ids` (positions len(keys) onwards; `covering`: their media, by position)."""
    out = list(keys)
    previous = out[-1] if out else b""
    for token in token_ids:
        item = (covering or {}).get(len(out))
        media = b"" if item is None else f"{item[0]}@{item[1]}".encode()
        previous = hashlib.blake2b(previous + token.to_bytes(8, "little") + media, digest_size=16).digest()
        out.append(previous)
    return out


@dataclass(slots=True)
class SessionRows:
    """The last request's content keys and rows (one per position, in the dtype they arrived in)."""

    keys: list[bytes]
    rows: torch.Tensor

    def covered(self, keys: list[bytes]) -> int:
        """How many leading positions of a request with `keys` have their row here."""
        low, high = 0, min(len(keys), len(self.keys))
        while low < high:  # a chain: equal keys at m - 1 mean equal prefixes of length m
            mid = (low + high + 1) // 2
            if keys[mid - 1] == self.keys[mid - 1]:
                low = mid
            else:
                high = mid - 1
        return low


class SessionStates:
    """Every session's rows, by the session's key; each session holds at most one request's (`max_rows`), and the
    block items of its clips."""

    def __init__(self, max_rows: int, num_mels: int) -> None:
        self.max_rows, self.num_mels = max_rows, num_mels
        self._sessions: dict[str, SessionRows] = {}
        self._clips: dict[str, ClipItems] = {}

    def clip_items(self, session: str) -> ClipItems:
        return self._clips.setdefault(session, ClipItems(self.num_mels))

    def get(self, session: str) -> SessionRows | None:
        return self._sessions.get(session)

    def put(self, session: str, keys: list[bytes], rows: torch.Tensor) -> None:
        if len(keys) != len(rows) or len(keys) > self.max_rows:
            self._sessions.pop(session, None)
            return
        self._sessions[session] = SessionRows(keys, rows)

    def forget(self, session: str) -> None:
        """The session ended: its rows go (its KV blocks stay in vLLM's cache until evicted, unreachable)."""
        self._sessions.pop(session, None)
        self._clips.pop(session, None)

    @property
    def num_bytes(self) -> int:
        return sum(s.rows.numel() * s.rows.element_size() for s in self._sessions.values())


@dataclass(slots=True)
class Recorder:
    """A session request's stream as the session's rows: the prompt's content keys, then the answer's."""

    keys: list[bytes] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def add(self, event: ThinkerEvent) -> None:
        if isinstance(event, HiddenStates):
            self.rows.append(event.rows)
        elif isinstance(event, ThinkerText):
            self.tokens += event.token_ids

    def store(self, sessions: SessionStates, session: str) -> None:
        """Every position that has a row: the prompt and every answer token but the last (never fed back). One
        copy: the rows arrive as views of whole ZMQ frames, which must not stay alive."""
        keys = extend_keys(self.keys, self.tokens[:-1])
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0)
        sessions.put(session, keys, rows)
