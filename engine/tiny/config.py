"""The tiny Qwen2.5-Omni configs: real token ids, vocab sizes and frame geometry; smaller widths and depths.

Head dims stay >= 32 wherever vLLM's CPU attention runs (thinker text model). The DiT codebook is
enlarged from the real 8193 to 8447 rows so that a random talker cannot index out of range.
`WIDE_CONFIG` is the tiny one with a thinker wide and deep enough that prefill costs what it costs a real
model, relative to the rest (what the turn-latency benchmark needs); the widths that must equal the thinker's
(the audio and vision encoders' outputs, the talker's input) follow it.
"""

import copy

TINY_CONFIG: dict = {
    "enable_audio_output": True,
    "thinker_config": {
        "audio_token_index": 151646,
        "image_token_index": 151655,
        "video_token_index": 151656,
        "audio_start_token_id": 151647,
        "audio_end_token_id": 151648,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "position_id_per_seconds": 25,
        "seconds_per_chunk": 2,
        "audio_config": {
            "num_mel_bins": 128,
            "d_model": 32,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "max_source_positions": 1500,
            "n_window": 100,
            "output_dim": 64,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        },
        "text_config": {
            "vocab_size": 152064,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [4, 6, 6],
            },
            "tie_word_embeddings": False,
        },
    },
    "talker_config": {
        "vocab_size": 8448,
        "embedding_size": 64,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 32768,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [4, 6, 6],
        },
    },
    "token2wav_config": {
        "dit_config": {
            "hidden_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "head_dim": 16,
            "ff_mult": 2,
            "emb_dim": 16,
            "block_size": 24,
            "look_ahead_layers": [1],
            "look_backward_layers": [0, 2],
            "repeats": 2,
            "num_embeds": 8447,
            "mel_dim": 80,
            "dropout": 0.0,
            "enc_emb_dim": 192,
            "enc_dim": 16,
            "enc_channels": [32, 32, 32, 32, 96],
            "enc_kernel_sizes": [5, 3, 3, 3, 1],
            "enc_dilations": [1, 2, 3, 4, 1],
            "enc_attention_channels": 8,
            "enc_res2net_scale": 2,
            "enc_se_channels": 8,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
            },
        },
        "bigvgan_config": {
            "mel_dim": 80,
            "upsample_initial_channel": 64,
            "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3, 5]],
            "upsample_rates": [5, 3, 2, 2, 2, 2],
            "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4],
        },
    },
}


def _wide_config() -> dict:
    config = copy.deepcopy(TINY_CONFIG)
    thinker = config["thinker_config"]
    thinker["text_config"].update(
        hidden_size=768,
        intermediate_size=1536,  # the tiny one's 2x
        num_hidden_layers=12,
        num_attention_heads=12,  # head_dim 64: one that vLLM's CPU attention supports
    )
    thinker["text_config"]["rope_parameters"]["mrope_section"] = [8, 12, 12]  # halves of head_dim 64
    thinker["audio_config"]["output_dim"] = 768
    thinker["vision_config"]["out_hidden_size"] = 768
    config["talker_config"]["embedding_size"] = 768
    return config


WIDE_CONFIG: dict = _wide_config()
SIZES: dict[str, dict] = {"tiny": TINY_CONFIG, "wide": WIDE_CONFIG}
