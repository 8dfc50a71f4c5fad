"""Code2Wav: codec codes -> 24 kHz speech, one-shot or streamed chunk by chunk for a batch of streams."""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from omnitalk.codecs.bigvgan import BigVGAN
from omnitalk.codecs.dit import DiT, DiTInputs, Modulation
from omnitalk.codecs.graphs import StaticCalls, bucket, pad_rows
from omnitalk.codecs.ode import dit_calls, integrate, stage_times
from omnitalk.codecs.streaming import (
    MEL_PER_CODE,
    ChunkPlan,
    Code2WavStream,
    NoiseBuffer,
    StreamingConfig,
    advance,
    plan_next,
)
from omnitalk.codecs.workers import Chunks, Code2WavWorker, WorkerDied

log = logging.getLogger(__name__)

DIT_PREFIX = "token2wav.code2wav_dit_model."
VOCODER_PREFIX = "token2wav.code2wav_bigvgan_model."
# A thread's share of a batch split with workers, relative to a worker's: on the CPU the talker's steps, which
# run in the thread while the workers decode, are about a quarter of the speech stage's work.
THREAD_WEIGHT = 0.75
# transformers' Qwen2_5OmniDiTConfig / Qwen2_5OmniBigVGANConfig defaults, for keys a config.json leaves out.
DIT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "num_hidden_layers": 22, "num_attention_heads": 16, "ff_mult": 2, "emb_dim": 512,
    "head_dim": 64, "block_size": 24, "look_ahead_layers": [10], "look_backward_layers": [0, 20], "repeats": 2,
    "num_embeds": 8193, "mel_dim": 80, "enc_emb_dim": 192, "enc_dim": 128, "enc_channels": [256, 256, 256, 256, 768],
    "enc_kernel_sizes": [5, 3, 3, 3, 1], "enc_dilations": [1, 2, 3, 4, 1], "enc_attention_channels": 64,
    "enc_res2net_scale": 2, "enc_se_channels": 64,
}  # fmt: skip
VOCODER_DEFAULTS: dict[str, Any] = {
    "mel_dim": 80, "upsample_initial_channel": 1536, "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5]] * 3, "upsample_rates": [5, 3, 2, 2, 2, 2],
    "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4],
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Speaker:
    cond: torch.Tensor  # [1, enc_emb_dim] x-vector
    spk: torch.Tensor  # [1, enc_dim] ECAPA of the speaker's reference mel
    null_spk: torch.Tensor  # [1, enc_dim] ECAPA of a zero mel of the same shape (the unconditional branch)


@dataclass(frozen=True, slots=True)
class Offload:
    """Rows of a `start_decode` left running in a worker; `Code2Wav.collect` gives their audio."""

    worker: Code2WavWorker
    rows: list[tuple[Code2WavStream, ChunkPlan]]
    indices: list[int]  # the rows' places in the list `start_decode` was given

    @property
    def ready(self) -> bool:
        """Whether the worker has answered, so that `collect` will not wait."""
        return self.worker.has_answered()


class Code2Wav:
    """The DiT and vocoder in their weights' dtype, with the speakers' cached conditioning. Not thread-safe.

    The ODE state, the guidance difference and the mel stay fp32 in any dtype (`DiT.velocity`, `BigVGAN`).
    `static_shapes` runs the DiT windows and vocoder batches of every non-final chunk at fixed shapes (batch
    padded to a bucket), captured as CUDA graphs on CUDA; by default it is on on CUDA unless `enforce_eager`.
    On the CPU, `start_workers` splits each batch's rows between the calling thread and worker processes.
    """

    def __init__(
        self,
        dit: DiT,
        vocoder: BigVGAN,
        speakers: dict[str, Speaker],
        config: StreamingConfig | None = None,
        enforce_eager: bool = False,
        static_shapes: bool | None = None,
    ) -> None:
        self.dit, self.vocoder, self.speakers = dit.eval(), vocoder.eval(), speakers
        self.config = config or StreamingConfig()
        self.config.check_blocks(dit.block_size)
        self.device = next(dit.parameters()).device
        self.dtype = next(dit.parameters()).dtype
        self.enforce_eager = enforce_eager
        on_cuda = self.device.type == "cuda" and not enforce_eager
        self.static_shapes = on_cuda if static_shapes is None else static_shapes
        self.static = StaticCalls(capture=on_cuda and self.static_shapes)
        cfg = self.config
        self.static_windows = {cfg.window_frames(k) for k in range(3)}
        first, chunk, tail = cfg.first_chunk_mel, cfg.chunk_mel, 2 * cfg.overlap_mel
        self.static_vocoder_frames = {first, min(tail, first) + chunk, tail + chunk}
        self.dit_calls = 0  # DiT forward passes so far (a CFG pair, one batched pass, counts once)
        self._modulations: dict[tuple[str, int], Modulation] = {}  # per (solver, num_steps): fixed times
        self.workers: list[Code2WavWorker] = []

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        config: StreamingConfig | None = None,
        dtype: torch.dtype = torch.float32,
        enforce_eager: bool = False,
    ) -> Code2Wav:
        """Loads `token2wav.*` weights and `spk_dict.pt` from a Hugging Face Qwen2.5-Omni checkpoint folder.

        Speaker vectors are computed in fp32, then everything is cast to `dtype` (bf16 on GPU).
        """
        path = Path(path)
        token2wav = json.loads((path / "config.json").read_text())["token2wav_config"]
        dit_cfg = {**DIT_DEFAULTS, **token2wav.get("dit_config", {})}
        dit_cfg.setdefault("rope_parameters", {"rope_theta": dit_cfg.get("rope_theta", 10000.0)})
        dit, vocoder = DiT(dit_cfg), BigVGAN({**VOCODER_DEFAULTS, **token2wav.get("bigvgan_config", {})})
        weights = _load_weights(path, "token2wav.")
        dit.load_state_dict(_strip(weights, DIT_PREFIX))
        vocoder.load_state_dict(_strip(weights, VOCODER_PREFIX))
        dit, vocoder = dit.to(device), vocoder.to(device)
        speakers = {}
        with torch.no_grad():
            for name, entry in torch.load(path / "spk_dict.pt", map_location="cpu", weights_only=True).items():
                ref_mel = entry["ref_mel"].float().to(device)
                speakers[name] = Speaker(
                    cond=entry["cond"].float().to(device).reshape(1, -1).to(dtype),
                    spk=dit.speaker_vector(ref_mel).to(dtype),
                    null_spk=dit.speaker_vector(torch.zeros_like(ref_mel)).to(dtype),
                )
        return cls(dit.to(dtype), vocoder.to(dtype), speakers, config, enforce_eager)

    def with_config(self, config: StreamingConfig) -> Code2Wav:
        """The same weights and speakers under other windows or ODE settings."""
        return Code2Wav(self.dit, self.vocoder, self.speakers, config, self.enforce_eager, self.static_shapes)

    def start_workers(self, count: int) -> None:
        """Adds `count` worker processes (CPU, eager), each with a copy of the weights and speakers."""
        if count and (self.device.type != "cpu" or self.static_shapes):
            raise ValueError("Code2Wav workers run on the CPU, eagerly (no static shapes)")
        workers = [self._spawn_worker() for _ in range(count)]
        for worker in workers:
            worker.wait_ready()
        self.workers += workers

    def _spawn_worker(self) -> Code2WavWorker:
        model = Code2Wav(self.dit, self.vocoder, self.speakers, self.config, enforce_eager=True, static_shapes=False)
        return Code2WavWorker(model, torch.get_num_threads())

    def new_stream(self, speaker: str, seed: int = 0) -> Code2WavStream:
        self._speaker(speaker)
        return Code2WavStream(speaker=speaker, seed=seed, noise=NoiseBuffer(seed, self.dit.mel_dim))

    def ready(self, stream: Code2WavStream) -> bool:
        """Whether `decode` would emit audio for the stream now."""
        return plan_next(stream, self.config) is not None

    def codes_needed(self, stream: Code2WavStream) -> int:
        """Codes the stream still needs before its next chunk can be decoded (0 once it has them)."""
        return max(0, self.config.codes_for_chunk(stream.chunks_done) - len(stream.codes))

    @torch.no_grad()
    def one_shot(
        self,
        codes: Sequence[int] | torch.Tensor,
        speaker: str,
        noise: torch.Tensor | None = None,
        seed: int = 0,
        solver: str | None = None,
        num_steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All codes at once, as transformers' token2wav: (mel [2n, 80], waveform [n * 480]) on CPU.

        `noise` [1, >= 2n, 80] is the DiT's initial state; without it, the same noise a stream with `seed` uses.
        """
        self._speaker(speaker)
        codes = torch.as_tensor(codes, dtype=torch.long).reshape(1, -1).to(self.device)
        frames = codes.shape[1] * MEL_PER_CODE
        if frames == 0:
            return torch.zeros(0, self.dit.mel_dim), torch.zeros(0)
        x0 = NoiseBuffer(seed, self.dit.mel_dim).take(0, frames)[None] if noise is None else noise[:, :frames]
        mel = self._sample(codes, [frames], [speaker], x0.float().to(self.device), solver, num_steps)
        return mel[0].cpu(), self.vocoder(mel)[0].cpu()

    @torch.no_grad()
    def decode(self, streams: Sequence[Code2WavStream]) -> list[np.ndarray]:
        """The next audio chunk (float32, 24 kHz) of each stream, decoded as one batch; empty if not ready."""
        audio, offloads = self.start_decode(streams)
        if (failure := self._collect_all(offloads, audio)) is not None:
            raise failure
        return audio

    def _collect_all(self, offloads: list[Offload], audio: list[np.ndarray]) -> Exception | None:
        """Every offload collected into `audio` (so no worker is left holding a stale answer); the first error."""
        failure = None
        for offload in offloads:
            try:
                for i, chunk in zip(offload.indices, self.collect(offload), strict=True):
                    audio[i] = chunk
            except Exception as error:
                failure = failure or error
        return failure

    @torch.no_grad()
    def start_decode(self, streams: Sequence[Code2WavStream]) -> tuple[list[np.ndarray], list[Offload]]:
        """`decode` with the workers' shares left running: the audio of this thread's share (empty for the other
        rows and for streams not ready), and one `Offload` per worker given rows, for `collect`.

        The rows go to the idle workers and this thread (`shares`). Until collected, an offloaded stream is
        `decoding`: not ready, so that its next chunk waits for this one.
        """
        if len({id(stream) for stream in streams}) < len(streams):
            raise ValueError("a stream is listed twice")
        plans = [plan_next(stream, self.config) for stream in streams]
        rows = [i for i, plan in enumerate(plans) if plan is not None]
        audio = [np.zeros(0, dtype=np.float32) for _ in streams]
        if not rows:
            return audio, []
        idle = [worker for worker in self.workers if not worker.busy]
        mine, *theirs = [rows[a:b] for a, b in shares(len(rows), len(idle))]
        offloads = []
        for worker, indices in zip(idle, theirs, strict=False):
            active = [(streams[i], plans[i]) for i in indices]
            try:
                worker.submit(self._chunks(active))
            except WorkerDied:  # it held nothing: its rows run here, and a fresh worker takes later batches
                log.warning("a Code2Wav worker (pid %s) was gone; starting another", worker.pid)
                self._replace(worker)
                mine += indices
                continue
            self.dit_calls += dit_calls(self.config.solver, self.config.num_steps)
            for stream, _ in active:
                stream.decoding = True
            offloads.append(Offload(worker, active, indices))
        if mine:
            active = [(streams[i], plans[i]) for i in mine]
            try:
                outputs = self.run_chunks(self._chunks(active))
            except Exception:
                self._collect_all(offloads, audio)  # the whole batch fails; its workers are freed first
                raise
            for i, chunk in zip(mine, self._emit(active, *outputs), strict=True):
                audio[i] = chunk
        return audio, offloads

    def collect(self, offload: Offload) -> list[np.ndarray]:
        """The audio of an offload's rows, in order (waits for the worker). If the worker failed, its error is
        raised (WorkerDied: it is replaced by a fresh one); either way its streams are no longer decoding."""
        for stream, _ in offload.rows:
            stream.decoding = False
        try:
            mels, wavs = offload.worker.result()
        except WorkerDied:
            self._replace(offload.worker)
            raise
        return self._emit(offload.rows, mels, wavs)

    def _replace(self, worker: Code2WavWorker) -> None:
        worker.close()
        self.workers = [self._spawn_worker() if w is worker else w for w in self.workers]

    def close(self) -> None:
        """Stops the worker processes (idempotent); decoding goes on in the calling thread."""
        workers, self.workers = self.workers, []
        for worker in workers:
            worker.close()

    def _emit(
        self, active: list[tuple[Code2WavStream, ChunkPlan]], mels: list[torch.Tensor], wavs: list[torch.Tensor]
    ) -> list[np.ndarray]:
        """Each row's chunk of audio, its overlap trimmed, with its stream advanced past it."""
        audio = []
        for (stream, plan), mel, wav in zip(active, mels, wavs, strict=True):
            chunk = wav[plan.trim_left : wav.shape[0] - plan.trim_right]
            advance(stream, plan, mel, chunk.shape[0], self.config)
            audio.append(chunk.cpu().numpy())
        return audio

    def _chunks(self, active: list[tuple[Code2WavStream, ChunkPlan]]) -> Chunks:
        """The rows' windows of codes and noise, their emitted range and their vocoder context."""
        lengths = [plan.window_end - plan.window_start for _, plan in active]
        width = max(lengths)
        x0 = torch.zeros(len(active), width, self.dit.mel_dim)
        codes = torch.zeros(len(active), width // MEL_PER_CODE, dtype=torch.long)
        for row, (stream, plan) in enumerate(active):
            x0[row, : lengths[row]] = stream.noise.take(plan.window_start, plan.window_end)
            window_codes = stream.codes[plan.window_start // MEL_PER_CODE : plan.window_end // MEL_PER_CODE]
            codes[row, : len(window_codes)] = torch.tensor(window_codes, dtype=torch.long)
        return Chunks(
            codes,
            x0,
            lengths,
            [stream.speaker for stream, _ in active],
            [(plan.emit_start - plan.window_start, plan.emit_end - plan.window_start) for _, plan in active],
            [stream.mel_tail for stream, _ in active],
        )

    @torch.no_grad()
    def run_chunks(self, chunks: Chunks) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One padded DiT solve over the rows' windows, then the vocoder on each row's context + new mel: the
        rows' new mel [n, 80] (fp32) and untrimmed waveforms. A pure function of `chunks` (what workers run)."""
        rows, width = len(chunks.lengths), chunks.x0.shape[1]
        lengths, speakers = list(chunks.lengths), list(chunks.speakers)
        bucketed = bucket(rows) if self.static_shapes and width in self.static_windows else None
        if bucketed is None:
            codes, x0 = chunks.codes.to(self.device), chunks.x0.to(self.device)
        else:
            speakers += speakers[:1] * (bucketed - rows)
            lengths += lengths[:1] * (bucketed - rows)
            codes, x0 = pad_rows(chunks.codes, bucketed).to(self.device), pad_rows(chunks.x0, bucketed).to(self.device)
        mel = self._sample(codes, lengths, speakers, x0, None, None, static=bucketed is not None)
        mels = [mel[row, start:end] for row, (start, end) in enumerate(chunks.emit)]
        inputs = [m if tail is None else torch.cat([tail, m]) for m, tail in zip(mels, chunks.tails, strict=True)]
        return mels, self._vocode(inputs)

    def _vocode(self, mels: list[torch.Tensor]) -> list[torch.Tensor]:
        """BigVGAN on each mel; equal lengths share a batch (padding would change the samples near the end)."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, mel in enumerate(mels):
            groups[mel.shape[0]].append(i)
        out: list[torch.Tensor] = [torch.empty(0)] * len(mels)
        for frames, indices in groups.items():
            batch = torch.stack([mels[i] for i in indices])
            rows = bucket(len(indices)) if self.static_shapes and frames in self.static_vocoder_frames else None
            if rows is None:
                wavs = self.vocoder(batch)
            else:
                wavs = self.static.run(("vocoder", rows, frames), self.vocoder, [pad_rows(batch, rows)])
            for i, wav in zip(indices, wavs, strict=False):  # padding rows are dropped
                out[i] = wav
        return out

    def _sample(
        self,
        codes: torch.Tensor,
        lengths: list[int],
        speakers: list[str],
        x0: torch.Tensor,
        solver: str | None,
        num_steps: int | None,
        static: bool = False,
    ) -> torch.Tensor:
        """Solves the flow ODE from x0 [B, L, 80] (fp32) at t = 0 to the mel at t = 1, as transformers' DiT sample.

        `static`: one fixed-buffer call per (batch, width), a CUDA graph on CUDA (inputs prepared outside it).
        """
        cfg = self.config
        solver, num_steps = solver or cfg.solver, num_steps or cfg.num_steps
        entries = [self.speakers[name] for name in speakers]
        guided = cfg.guidance_scale >= 1e-5  # transformers skips the unconditional branch below this
        inputs: DiTInputs = self.dit.prepare(
            codes,
            torch.cat([e.spk for e in entries]),
            torch.cat([e.cond for e in entries]),
            lengths,
            torch.cat([e.null_spk for e in entries]) if guided else None,
            per_row_masks=static,
        )
        times = self._times(num_steps)
        modulation = self._modulation(solver, num_steps)
        self.dit_calls += dit_calls(solver, num_steps)
        unique = list({id(mask): mask for mask in inputs.masks}.values())
        layer_mask = [next(i for i, m in enumerate(unique) if m is mask) for mask in inputs.masks]

        def solve(x: torch.Tensor, context: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *masks: torch.Tensor):
            fixed = DiTInputs(context, [masks[i] for i in layer_mask], cos, sin)
            velocity = functools.partial(self.dit.velocity, inputs=fixed, modulation=modulation)
            return integrate(lambda k, y: velocity(y, k, guidance_scale=cfg.guidance_scale), x, times, solver)

        tensors = [x0, inputs.context, inputs.cos, inputs.sin, *unique]
        if not static:
            return solve(*tensors)
        return self.static.run(("dit", *x0.shape, guided, solver, num_steps), solve, tensors)

    def _times(self, num_steps: int) -> torch.Tensor:
        """The solve's time grid: transformers' sway sampling of [0, 1]."""
        times = torch.linspace(0, 1, num_steps, device=self.device, dtype=torch.float32)
        return times + self.config.sway_coefficient * (torch.cos(torch.pi / 2 * times) - 1 + times)

    def _modulation(self, solver: str, num_steps: int) -> Modulation:
        """The DiT's time conditioning at every evaluation of a solve, computed once per solver and grid."""
        key = (solver, num_steps)
        if key not in self._modulations:
            self._modulations[key] = self.dit.modulation(stage_times(self._times(num_steps), solver))
        return self._modulations[key]

    def _speaker(self, name: str) -> Speaker:
        if name not in self.speakers:
            raise ValueError(f"unknown speaker {name!r}; known: {sorted(self.speakers)}")
        return self.speakers[name]


def shares(rows: int, workers: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `rows` rows: the calling thread's first, then one per worker that gets any.

    The workers' shares are near-equal; the thread's is `THREAD_WEIGHT` of an equal share, rounded down
    (none for a single row), because the thread also steps the talker while the workers decode."""
    mine = int(rows / (workers + 1) * THREAD_WEIGHT) if workers else rows
    rest, parts = rows - mine, min(workers, rows - mine)
    sizes = [mine] + [rest // parts + (i < rest % parts) for i in range(parts)]
    return list(itertools.pairwise(itertools.accumulate(sizes, initial=0)))


def _load_weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """fp32 tensors whose names start with `prefix`, from the shards the index lists (or every shard)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for name, f in weight_map.items() if name.startswith(prefix)})
    else:
        files = sorted(path.glob("*.safetensors"))
    weights = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if name.startswith(prefix):
                    weights[name] = handle.get_tensor(name).float()
    return weights


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): t for name, t in weights.items() if name.startswith(prefix)}
