"""The talker engine: admits sequences into KV cache slots and steps all of them in one batched forward."""

from __future__ import annotations

from pathlib import Path

import torch

from omnitalk.engine.talker.kv_cache import KVCache
from omnitalk.engine.talker.model import Attend, TalkerModel
from omnitalk.engine.talker.positions import talker_positions
from omnitalk.engine.talker.sampling import sample
from omnitalk.engine.talker.sequence import TalkerSequence


class Talker:
    """Model runner + KV cache. Which sequences step when is the caller's choice (the co-scheduler).

    Not thread-safe: feed sequences and call `step` from one thread, or under one lock.
    """

    def __init__(self, model: TalkerModel, speakers: dict[str, int], max_slots: int, max_len: int) -> None:
        self.model = model
        self.config = model.config
        self.speakers = speakers  # name -> the text bos token that announces the voice
        self.device = model.inv_freq.device
        c = self.config
        dtype = model.codec_head.weight.dtype
        self.cache = KVCache(c.num_layers, max_slots, c.num_kv_heads, max_len, c.head_dim, dtype, self.device)
        self._seen = torch.zeros(max_slots, c.vocab_size, dtype=torch.bool, device=self.device)  # penalised codes
        self._generators: dict[int, torch.Generator] = {}
        self._multimodal_ids = torch.tensor([c.audio_id, c.image_id, c.video_id], device=self.device)
        self.last_logits: torch.Tensor | None = None  # raw codec_head logits [B, V] of the last step's seqs

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_slots: int = 64,
        max_len: int = 4096,
    ) -> Talker:
        """`max_len` bounds prompt + 2 + codes per request (at 50 codes/s, 4096 leaves ~70 s after a 1k prompt)."""
        path = Path(path)
        speakers = torch.load(path / "spk_dict.pt", map_location="cpu", weights_only=True)
        voices = {name: int(entry["bos_token"]) for name, entry in speakers.items()}
        return cls(TalkerModel.from_checkpoint(path, dtype, device), voices, max_slots, max_len)

    @property
    def num_free_slots(self) -> int:
        return self.cache.num_free

    def add(self, seq: TalkerSequence) -> None:
        """Gives `seq` a slot; raises ValueError for an unknown voice or a prompt too long, RuntimeError when full."""
        if seq.speaker not in self.speakers:
            raise ValueError(f"unknown speaker {seq.speaker!r}; available: {sorted(self.speakers)}")
        if len(seq.prompt_ids) + 2 > self.cache.max_len:
            raise ValueError(f"prompt of {len(seq.prompt_ids)} tokens exceeds the talker's max_len")
        if seq.slot is not None or seq.prefilled or seq.finished:
            raise ValueError(f"sequence {seq.request_id} was already added or has finished")
        talker_positions(seq.positions, len(seq.prompt_ids))  # fail at admission, not inside a batched step
        seq.slot = slot = self.cache.allocate()
        c = self.config
        self._seen[slot] = False  # the penalty covers generate()'s talker input_ids: [mask] * L + [pad, bos] + codes
        self._seen[slot, [c.codec_mask_id, c.codec_pad_id, c.codec_bos_id]] = True
        generator = torch.Generator(self.device)
        if seq.sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(seq.sampling.seed)
        self._generators[slot] = generator

    def free(self, seq: TalkerSequence) -> None:
        """Releases the slot (idempotent); an unfinished sequence ends as "abort"."""
        if seq.finish_reason is None:
            seq.finish_reason = "abort"
        if seq.slot is not None:
            self._generators.pop(seq.slot, None)
            self.cache.release(seq.slot)
            seq.slot = None

    @torch.inference_mode()
    def step(self, seqs: list[TalkerSequence]) -> list[int | None]:
        """One step of every given sequence (each must be added and `ready`): the new code of each, or None
        when it stopped on a stop code. Sequences that finish (stop or length) release their slot here."""
        if len({id(seq) for seq in seqs}) < len(seqs):
            raise ValueError("a sequence is listed twice")
        for seq in seqs:
            if seq.slot is None or not seq.ready:
                state = "finished" if seq.finished else "not added" if seq.slot is None else "not ready"
                raise ValueError(f"cannot step {seq.request_id}: {state}")
        if not seqs:
            return []
        prefill = [i for i, s in enumerate(seqs) if not s.prefilled]
        decode = sorted((i for i, s in enumerate(seqs) if s.prefilled), key=lambda i: seqs[i].slot)
        logits = [self._prefill([seqs[i] for i in prefill])] if prefill else []
        logits += [self._decode([seqs[i] for i in decode])] if decode else []
        inverse = torch.empty(len(seqs), dtype=torch.long)
        inverse[prefill + decode] = torch.arange(len(seqs))
        self.last_logits = torch.cat(logits)[inverse.to(self.device)]
        slots = [seq.slot for seq in seqs]
        codes = sample(
            self.last_logits,
            self._seen[slots],
            [seq.sampling for seq in seqs],
            [self._generators[slot] for slot in slots],
            [self.config.codec_bos_id],
        )
        self._seen[slots, codes] = True
        return [self._record(seq, code) for seq, code in zip(seqs, codes, strict=True)]

    def _record(self, seq: TalkerSequence, code: int) -> int | None:
        if code in seq.sampling.stop_codes:
            seq.finish_reason = "stop"
        else:
            seq.codes.append(code)
            if len(seq.codes) >= seq.sampling.max_tokens or seq.num_cached >= self.cache.max_len:
                seq.finish_reason = "length"
        if seq.finished:
            self.free(seq)
        return None if seq.finish_reason == "stop" else code

    def _prefill(self, seqs: list[TalkerSequence]) -> torch.Tensor:
        """Prompt + [speaker bos, g0] of each new sequence, right-padded into one forward."""
        c, codec = self.config, self.model.model.embed_tokens.weight
        embeds, positions = [], []
        for seq in seqs:
            rows, ids = seq.take_prefill()
            ids_t = torch.tensor(ids, device=self.device)
            text = self.model.text_embed(ids_t).masked_fill(torch.isin(ids_t, self._multimodal_ids)[:, None], 0)
            x = rows.to(self.device, text.dtype) + text  # rows 0..L: prompt, then g0
            voice = self.model.text_embed.weight[self.speakers[seq.speaker]] + codec[c.codec_pad_id]
            embeds.append(torch.cat([x[:-1], voice[None], (x[-1] + codec[c.codec_bos_id])[None]]))
            pos, seq.rope_delta = talker_positions(seq.positions, len(seq.prompt_ids))
            positions.append(pos)
        lengths = [len(e) for e in embeds]
        width = max(lengths)
        embeds_t = torch.stack([torch.nn.functional.pad(e, (0, 0, 0, width - len(e))) for e in embeds])
        positions_t = torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in positions], dim=1)
        logits = self._forward(seqs, embeds_t, positions_t.to(self.device), [0] * len(seqs), lengths)
        for seq, n in zip(seqs, lengths, strict=True):
            seq.num_cached = n
        return logits

    def _decode(self, seqs: list[TalkerSequence]) -> torch.Tensor:
        """E_codec(last code) + the text side (h(g_j) + E(g_j), or E(text_eos / text_pad)) of each sequence."""
        c = self.config
        rows = torch.zeros(len(seqs), c.embedding_size, dtype=self.model.text_embed.weight.dtype, device=self.device)
        text_ids = []
        for i, seq in enumerate(seqs):
            row, text_id = seq.take_decode(c.text_eos_id, c.text_pad_id)
            if row is not None:
                rows[i] = row
            text_ids.append(text_id)
        reply = rows + self.model.text_embed(torch.tensor(text_ids, device=self.device))
        codes = torch.tensor([seq.codes[-1] for seq in seqs], device=self.device)
        embeds = (self.model.model.embed_tokens(codes) + reply)[:, None]
        starts = [seq.num_cached for seq in seqs]
        positions = torch.tensor([n + seq.rope_delta for n, seq in zip(starts, seqs, strict=True)], device=self.device)
        logits = self._forward(seqs, embeds, positions.view(1, -1, 1).expand(3, -1, -1), starts, [1] * len(seqs))
        for seq in seqs:
            seq.num_cached += 1
        return logits

    def _forward(
        self,
        seqs: list[TalkerSequence],
        embeds: torch.Tensor,
        positions: torch.Tensor,
        starts: list[int],
        lengths: list[int],
    ) -> torch.Tensor:
        """Raw logits [B, V] (fp32) at each sequence's last new token; writes their keys and values."""
        batch, width = embeds.shape[:2]
        slots = [seq.slot for seq in seqs]
        offsets = torch.arange(width, device=self.device)
        write = torch.tensor(starts, device=self.device)[:, None] + offsets  # [B, T]
        kv_len = max(starts) + width
        # Padded queries past a sequence's length write keys there too; they sit beyond its length until
        # real tokens overwrite them, and no real query sees them before that.
        mask = torch.arange(kv_len, device=self.device) <= write[:, None, :, None]
        consecutive = slots == list(range(slots[0], slots[0] + batch))
        at = Attend(
            slots=torch.tensor(slots, device=self.device),
            write=write,
            mask=mask,
            kv_len=kv_len,
            slot_range=slice(slots[0], slots[0] + batch) if consecutive else None,
        )
        hidden = self.model(embeds, positions, self.cache.data, at)
        last = hidden[torch.arange(batch, device=self.device), torch.tensor(lengths, device=self.device) - 1]
        return self.model.codec_head(last).float()
