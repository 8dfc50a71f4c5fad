"""Our vLLM thinker's TMRoPE positions equal transformers' `get_rope_index` for every kind of input.

No engine is started: vLLM's multimodal processor runs in the test process and gives the prompt ids and
`mm_features` the engine would see; transformers' processor gives `get_rope_index`'s inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

SR = 16_000  # Hz, the feature extractor's rate
FPS = 2  # Qwen2.5-Omni's processor assumes frames sampled at 2 fps
rng = np.random.default_rng(0)


def tone(seconds: float) -> np.ndarray:
    n = int(seconds * SR)
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / SR) + rng.normal(0, 0.01, n)).astype(np.float32)


def picture(width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def clip(seconds: float, size: int = 112) -> np.ndarray:
    """uint8 [T, H, W, 3] frames at FPS."""
    return rng.integers(0, 256, (int(seconds * FPS), size, size, 3), dtype=np.uint8)


@dataclass
class Prompt:
    """One user turn: content parts in order, plus the media each part carries."""

    parts: list[dict[str, str]] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)  # soundtracks too, in their video's place
    images: list[Image.Image] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)
    use_audio_in_video: bool = False

    def text(self, words: str) -> Prompt:
        self.parts.append({"type": "text", "text": words})
        return self

    def sound(self, samples: np.ndarray) -> Prompt:
        self.parts.append({"type": "audio"})
        self.audio.append(samples)
        return self

    def image(self, image: Image.Image) -> Prompt:
        self.parts.append({"type": "image"})
        self.images.append(image)
        return self

    def video(self, frames: np.ndarray, soundtrack: np.ndarray | None = None) -> Prompt:
        self.parts.append({"type": "video"})
        self.videos.append(frames)
        if soundtrack is not None:
            self.audio.append(soundtrack)
            self.use_audio_in_video = True
        return self


PROMPTS: dict[str, Prompt] = {
    "text": Prompt().text("Hello, world! What can you hear?"),
    "audio": Prompt().sound(tone(3.0)).text("What do you hear?"),
    "audio-45s": Prompt().text("Transcribe: ").sound(tone(45.0)),
    "image": Prompt().image(picture(224, 224)).text("Describe it."),
    "image-non-square": Prompt().image(picture(340, 150)).text("Describe it."),
    "video": Prompt().video(clip(4.0)).text("What happens?"),
    "mixed": Prompt()
    .text("First ")
    .sound(tone(2.2))
    .image(picture(224, 224))
    .text(" then ")
    .video(clip(3.0))
    .sound(tone(1.1))
    .image(picture(150, 300))
    .text(" done."),
    "audio-in-video": Prompt().video(clip(4.0), tone(4.0)).text("What happens?"),
    "audio-in-video-longer-soundtrack": Prompt().video(clip(4.0), tone(5.3)).text("What happens?"),
    "audio-in-video-shorter-soundtrack": Prompt().video(clip(4.0), tone(2.7)).text("What happens?"),
    "audio-in-video-many-chunks": Prompt().video(clip(9.0), tone(9.3)).text("What happens?"),
    "audio-in-video-two-videos-and-images": Prompt()
    .image(picture(224, 224))
    .video(clip(4.0), tone(4.4))
    .text(" versus ")
    .video(clip(3.0, size=168), tone(2.1))
    .image(picture(150, 300))
    .text("?"),
}
AUDIO_IN_VIDEO = sorted(name for name, prompt in PROMPTS.items() if prompt.use_audio_in_video)


def real_length_audio_kwargs(clips: list[np.ndarray], n_fft: int) -> dict[str, Any]:
    """Audio kwargs that compute mel features for the real length instead of 300 s, for both processors.

    Padding to the longest clip plus half an STFT window keeps every real frame's window inside zero
    padding, as the default 300 s padding does; padding to the longest clip alone changes its last frame
    and can drop one (the extractor's frame count is floor(len / hop), its mask's ceil(len / hop)).
    """
    return {"audio_kwargs": {"max_length": max(len(c) for c in clips) + n_fft // 2}} if clips else {}


@pytest.fixture(scope="module")
def model_config(tiny_dir: Path):
    from vllm.config import ModelConfig

    return ModelConfig(model=str(tiny_dir))


@pytest.fixture(scope="module")
def vllm_processor(model_config):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    return MULTIMODAL_REGISTRY.create_processor(model_config)


@pytest.fixture(scope="module")
def hf_processor(tiny_dir: Path):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def hf_thinker(tiny_dir: Path):
    """transformers' thinker on the meta device: `get_rope_index` needs only its config."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniThinkerForConditionalGeneration

    config = Qwen2_5OmniConfig.from_pretrained(tiny_dir).thinker_config
    with torch.device("meta"):
        return Qwen2_5OmniThinkerForConditionalGeneration(config)


@pytest.fixture(scope="module")
def thinker(model_config):
    """Our class with no towers or weights: `get_mrope_input_positions` reads only `config`."""
    from omnitalk.engine.thinker.model import OmniThinkerForConditionalGeneration

    model = OmniThinkerForConditionalGeneration.__new__(OmniThinkerForConditionalGeneration)
    torch.nn.Module.__init__(model)
    model.config = model_config.hf_config.thinker_config  # what vLLM's __init__ sets
    return model


@dataclass
class Processed:
    vllm_ids: list[int]
    mm_features: list[Any]  # vLLM's MultiModalFeatureSpec, as the engine core receives them
    hf_ids: list[int]
    hf_positions: torch.Tensor  # [3, L]
    hf_delta: int


def process(prompt: Prompt, vllm_processor, hf_processor, hf_thinker) -> Processed:
    from vllm.multimodal.inputs import MultiModalFeatureSpec
    from vllm.multimodal.utils import argsort_mm_positions

    conversation = [{"role": "user", "content": prompt.parts}]
    text = hf_processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    audio_kwargs = real_length_audio_kwargs(prompt.audio, hf_processor.feature_extractor.n_fft)

    mm_data: dict[str, list[Any]] = {
        "audio": [(samples, SR) for samples in prompt.audio],
        "image": prompt.images,
        "video": prompt.videos,
    }
    kwargs = {**audio_kwargs, "use_audio_in_video": prompt.use_audio_in_video}
    mm_items = vllm_processor.info.parse_mm_data({k: v for k, v in mm_data.items() if v})
    result = vllm_processor(text, mm_items, hf_processor_mm_kwargs=kwargs)
    placeholders = result["mm_placeholders"]
    mm_features = [  # as vLLM's InputProcessor builds them
        MultiModalFeatureSpec(
            data=result["mm_kwargs"][modality][i],
            modality=modality,
            identifier=result["mm_hashes"][modality][i],
            mm_position=placeholders[modality][i],
        )
        for modality, i in argsort_mm_positions(placeholders)
    ]

    hf = hf_processor(
        text=text,
        audio=prompt.audio or None,
        images=prompt.images or None,
        videos=prompt.videos or None,
        use_audio_in_video=prompt.use_audio_in_video,
        return_tensors="pt",
        **audio_kwargs,
    )
    feature_mask = hf.get("feature_attention_mask")
    positions, delta = hf_thinker.get_rope_index(
        hf["input_ids"],
        image_grid_thw=hf.get("image_grid_thw"),
        video_grid_thw=hf.get("video_grid_thw"),
        attention_mask=hf["attention_mask"],
        use_audio_in_video=prompt.use_audio_in_video,
        audio_seqlens=None if feature_mask is None else feature_mask.sum(-1),
        second_per_grids=hf.get("video_second_per_grid"),
    )
    hf_ids = hf["input_ids"][0].tolist()
    return Processed(result["prompt_token_ids"], mm_features, hf_ids, positions[:, 0], int(delta))


@pytest.fixture(scope="module")
def processed(vllm_processor, hf_processor, hf_thinker) -> dict[str, Processed]:
    return {name: process(p, vllm_processor, hf_processor, hf_thinker) for name, p in PROMPTS.items()}


def mismatches(actual: torch.Tensor, expected: torch.Tensor) -> str:
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    wrong = (actual != expected).any(0).nonzero().flatten().tolist()
    return f"{len(wrong)} of {expected.shape[1]} positions differ, first at {wrong[:5]}"


@pytest.mark.parametrize("name", list(PROMPTS))
def test_vllm_prompt_ids_equal_transformers(processed, name):
    case = processed[name]
    assert case.vllm_ids == case.hf_ids


@pytest.mark.parametrize("name", list(PROMPTS))
def test_positions_equal_transformers_get_rope_index(processed, thinker, name):
    case = processed[name]
    positions, delta = thinker.get_mrope_input_positions(case.vllm_ids, case.mm_features)
    assert torch.equal(positions.long(), case.hf_positions), mismatches(positions, case.hf_positions)
    assert delta == case.hf_delta


@pytest.mark.parametrize("name", AUDIO_IN_VIDEO)
def test_stock_vllm_positions_are_wrong_for_audio_in_video(processed, thinker, name):
    """Guards the fix: vLLM's own method gives `<|audio_bos|>` the position after `<|vision_bos|>`'s."""
    from vllm.model_executor.models.qwen2_5_omni_thinker import Qwen2_5OmniThinkerForConditionalGeneration

    case = processed[name]
    stock, _ = Qwen2_5OmniThinkerForConditionalGeneration.get_mrope_input_positions(
        thinker, case.vllm_ids, case.mm_features
    )
    audio_bos = case.vllm_ids.index(thinker.config.audio_start_token_id)
    assert (stock[:, audio_bos] == case.hf_positions[:, audio_bos] + 1).all()
    assert not torch.equal(stock.long(), case.hf_positions)


def test_real_length_audio_kwargs_give_the_default_features(hf_processor):
    """The kwargs used above lose nothing: same mask lengths and features as the default 300 s padding."""
    clips = [tone(2.1)[:32_013], tone(3.0)]  # one length not a multiple of the hop (160)
    text = "<|audio_bos|><|AUDIO|><|audio_eos|>" * len(clips)
    default = hf_processor(text=text, audio=clips, return_tensors="pt")
    kwargs = real_length_audio_kwargs(clips, hf_processor.feature_extractor.n_fft)
    real = hf_processor(text=text, audio=clips, return_tensors="pt", **kwargs)
    lengths = default["feature_attention_mask"].sum(-1)
    assert real["feature_attention_mask"].sum(-1).tolist() == lengths.tolist() == [201, 300]
    assert real["input_features"].shape[-1] == 301  # not 30_000
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(real["input_features"][i, :, :n], default["input_features"][i, :, :n])
    assert torch.equal(real["input_ids"], default["input_ids"])


def test_plugin_maps_the_omni_architectures_to_our_class(model_config, vllm_processor):
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_mrope, supports_multimodal
    from vllm.model_executor.models.qwen2_5_omni_thinker import (
        Qwen2_5OmniThinkerForConditionalGeneration,
        Qwen2_5OmniThinkerMultiModalProcessor,
    )

    from omnitalk.engine.thinker.model import OmniThinkerForConditionalGeneration
    from omnitalk.engine.thinker.plugin import ARCHITECTURES, register

    register()
    for architecture in ("Qwen2_5OmniForConditionalGeneration", *ARCHITECTURES):
        model_cls, _ = ModelRegistry.resolve_model_cls(architecture, model_config)
        assert model_cls is OmniThinkerForConditionalGeneration
    assert supports_multimodal(model_cls) and supports_mrope(model_cls)
    # vLLM's multimodal registry reads the class attribute `register_processor` set: subclasses inherit it.
    assert model_cls._processor_factory is Qwen2_5OmniThinkerForConditionalGeneration._processor_factory
    assert isinstance(vllm_processor, Qwen2_5OmniThinkerMultiModalProcessor)
