"""The talker's tensors: the KV pool, per-sequence sampling state, batched prefill / decode / sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnitalk.engine.talker.graphs import DecodeGraphs, DecodeInputs
from omnitalk.engine.talker.model import Context, TalkerModel
from omnitalk.engine.talker.positions import talker_positions
from omnitalk.engine.talker.sampling import TalkerSampling, sample, seed_words
from omnitalk.engine.talker.sequence import TalkerSequence

CUDA_MEMORY_SHARE = 0.15  # of the device's memory, for the KV pool when no budget is given
CPU_MEMORY_GIB = 1.0  # RAM pages are only taken once written


def default_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return CUDA_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory / 2**30
    return CPU_MEMORY_GIB


def kv_bytes_per_token(model: TalkerModel) -> int:
    c = model.config
    return c.num_layers * 2 * c.num_kv_heads * c.head_dim * model.codec_head.weight.element_size()


class ModelRunner:
    """Owns every tensor of the talker; which blocks and slots a sequence holds is decided by the `Talker`."""

    def __init__(
        self,
        model: TalkerModel,
        speakers: dict[str, int],
        num_blocks: int,
        block_size: int,
        max_seqs: int,
        max_blocks: int,
        eager: bool,
    ) -> None:
        self.model, self.config, self.block_size = model, model.config, block_size
        self.speakers = speakers  # name -> the text bos token that announces the voice
        self.device = model.inv_freq.device
        c, dtype = self.config, model.codec_head.weight.dtype
        # Block num_blocks is scratch: padded graph rows write there. Zeros, not empty: masked keys still
        # enter the score matmul, and NaN garbage would poison it.
        self.pool = torch.zeros(
            c.num_layers, 2, num_blocks + 1, block_size, c.num_kv_heads, c.head_dim, dtype=dtype, device=self.device
        )
        self.seen = torch.zeros(max_seqs, c.vocab_size, dtype=torch.bool, device=self.device)  # penalised codes
        self.seeds = torch.zeros(max_seqs, 2, dtype=torch.long, device=self.device)
        self._multimodal_ids = torch.tensor([c.audio_id, c.image_id, c.video_id], device=self.device)
        self.graphs = None
        if self.device.type == "cuda" and not eager:
            args = (max_seqs, max_blocks, num_blocks, block_size, c.embedding_size, dtype, self.device)
            self.graphs = DecodeGraphs(self.decode_forward, *args)

    def start(self, slot: int, sampling: TalkerSampling) -> None:
        """Fresh sampling state: the penalty covers generate()'s talker input_ids: [mask] * L + [pad, bos] + codes."""
        c = self.config
        self.seen[slot] = False
        self.seen[slot, [c.codec_mask_id, c.codec_pad_id, c.codec_bos_id]] = True
        self.seeds[slot] = torch.tensor(seed_words(sampling.seed))

    def sample(self, seqs: list[TalkerSequence], logits: torch.Tensor) -> list[int]:
        slots = torch.tensor([seq.slot for seq in seqs], device=self.device)
        steps = torch.tensor([len(seq.codes) for seq in seqs], device=self.device)
        params = [seq.sampling for seq in seqs]
        codes = sample(logits, self.seen[slots], params, self.seeds[slots], steps, [self.config.codec_bos_id])
        self.seen[slots, codes] = True
        return codes.tolist()

    def prefill(self, seqs: list[TalkerSequence]) -> torch.Tensor:
        """Prompt + [speaker bos, g0] of each new sequence from its cached prefix on, right-padded into one
        forward: logits [B, V]. With a cached prefix in the batch, every row attends over its blocks in the pool
        (where its new keys are written first), masked causally from its own start."""
        embeds, positions = [], []
        for seq in seqs:
            embeds.append(self._prefill_embeds(seq))
            pos, seq.rope_delta = talker_positions(seq.positions, len(seq.prompt_ids))
            positions.append(pos[:, seq.num_prefix_tokens :])
        hidden, lengths = self._prefill_forward(seqs, embeds, positions)
        last = hidden[torch.arange(len(seqs), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        return self.model.codec_head(last).float()

    def prefill_prompt(self, seq: TalkerSequence) -> None:
        """The keys and values of a prompt-only sequence's prompt from its cached prefix on, into its blocks: no
        voice or g0 row and no logits (the talker's prefill ahead). They are what `prefill` writes for those
        positions: a prompt position's input is its row, its token and its position, and attention is causal."""
        length = len(seq.prompt_ids)
        positions, _ = talker_positions(seq.positions, length)
        embeds = self._prompt_embeds(*seq.take_prompt())
        self._prefill_forward([seq], [embeds], [positions[:, seq.num_prefix_tokens : length]])

    def _prefill_forward(
        self, seqs: list[TalkerSequence], embeds: list[torch.Tensor], positions: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[int]]:
        """One forward of each sequence's new inputs (from its cached prefix on), right-padded: its keys and values
        go to its blocks; the last-layer states [B, T, hidden] and each row's length."""
        starts = [seq.num_prefix_tokens for seq in seqs]
        lengths = [len(e) for e in embeds]
        width = max(lengths)
        embeds_t = torch.stack([F.pad(e, (0, 0, 0, width - len(e))) for e in embeds])
        positions_t = torch.stack([F.pad(p, (0, width - p.shape[1])) for p in positions], dim=1).to(self.device)
        valid = torch.cat([b * width + torch.arange(n) for b, n in enumerate(lengths)])
        spans = zip(seqs, lengths, starts, strict=True)
        write = torch.cat([self._pool_indexes(seq, n, start) for seq, n, start in spans])
        ctx = Context(write=write.to(self.device), valid=valid.to(self.device))
        if any(starts):
            ctx.block_tables = self._block_tables(seqs)
            ctx.mask = self._prefix_mask(starts, lengths, width, ctx.block_tables.shape[1])
        hidden = self.model(embeds_t, positions_t, self.pool, ctx)
        for seq, start, n in zip(seqs, starts, lengths, strict=True):
            seq.num_cached = start + n
        return hidden, lengths

    def decode(self, seqs: list[TalkerSequence]) -> torch.Tensor:
        """One token of each sequence: E_codec(last code) + the text side; logits [B, V]."""
        inputs = self._decode_inputs(seqs)
        logits = self.decode_forward(inputs) if self.graphs is None else self.graphs.run(inputs)
        for seq in seqs:
            seq.num_cached += 1
        return logits

    def decode_forward(self, inputs: DecodeInputs) -> torch.Tensor:
        """The decode step proper, from tensors only: what a CUDA graph captures."""
        keys = inputs.block_tables.shape[1] * self.block_size
        mask = torch.arange(keys, device=inputs.write.device) < inputs.context_lens[:, None]
        ctx = Context(write=inputs.write, block_tables=inputs.block_tables, mask=mask[:, None, None])
        positions = inputs.positions.view(1, -1, 1).expand(3, -1, -1)
        hidden = self.model(inputs.embeds, positions, self.pool, ctx)
        return self.model.codec_head(hidden[:, -1]).float()

    def _prefill_embeds(self, seq: TalkerSequence) -> torch.Tensor:
        c, codec = self.config, self.model.model.embed_tokens.weight
        x = self._prompt_embeds(*seq.take_prefill())  # rows P..L: the prompt after its cached prefix, then g0
        voice = self.model.text_embed.weight[self.speakers[seq.speaker]] + codec[c.codec_pad_id]
        return torch.cat([x[:-1], voice[None], (x[-1] + codec[c.codec_bos_id])[None]])

    def _prompt_embeds(self, rows: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """h(x) + E'(x) of each row and its token: E' is zero for the audio, image and video placeholders."""
        ids_t = torch.tensor(ids, device=self.device)
        text = self.model.text_embed(ids_t).masked_fill(torch.isin(ids_t, self._multimodal_ids)[:, None], 0)
        return rows.to(self.device, text.dtype) + text

    def _decode_inputs(self, seqs: list[TalkerSequence]) -> DecodeInputs:
        c = self.config
        taken = [seq.take_decode(c.text_eos_id, c.text_pad_id) for seq in seqs]
        present = [row for row, _ in taken if row is not None]
        zero = present[0].new_zeros(c.embedding_size) if present else torch.zeros(c.embedding_size)
        rows = torch.stack([zero if row is None else row for row, _ in taken])  # one copy to the device, below
        text_ids = torch.tensor([text_id for _, text_id in taken], device=self.device)
        codes = torch.tensor([seq.codes[-1] for seq in seqs], device=self.device)
        reply = rows.to(self.device, self.model.text_embed.weight.dtype) + self.model.text_embed(text_ids)
        return DecodeInputs(
            embeds=(self.model.model.embed_tokens(codes) + reply)[:, None],
            positions=torch.tensor([seq.num_cached + seq.rope_delta for seq in seqs], device=self.device),
            write=torch.cat([self._pool_indexes(seq, 1, seq.num_cached) for seq in seqs]).to(self.device),
            block_tables=self._block_tables(seqs),
            context_lens=torch.tensor([seq.num_cached + 1 for seq in seqs], device=self.device),
        )

    def _prefix_mask(self, starts: list[int], lengths: list[int], width: int, blocks: int) -> torch.Tensor:
        """[B, 1, T, blocks * block_size]: query t of row b (position start_b + t) sees the keys up to its own; a
        padded query (t >= length_b) sees all of its row's keys, so its softmax stays finite."""
        keys = torch.arange(blocks * self.block_size)
        first = torch.tensor(starts)[:, None, None]
        end = first + torch.tensor(lengths)[:, None, None]
        mask = (keys <= first + torch.arange(width)[:, None]) & (keys < end)
        return mask[:, None].to(self.device)

    def _block_tables(self, seqs: list[TalkerSequence]) -> torch.Tensor:
        """[B, blocks] on the device; a short row repeats its last block: past its length the mask hides it."""
        blocks = max(len(seq.block_table) for seq in seqs)
        tables = [s.block_table + s.block_table[-1:] * (blocks - len(s.block_table)) for s in seqs]
        return torch.tensor(tables).to(self.device)

    def _pool_indexes(self, seq: TalkerSequence, n: int, start: int = 0) -> torch.Tensor:
        """Pool token indexes (CPU) of cache rows start..start+n-1 of `seq`."""
        rows = torch.arange(start, start + n)
        return torch.tensor(seq.block_table)[rows // self.block_size] * self.block_size + rows % self.block_size
