"""Real modelling code from ``transformers``: small configs (random weights), one example input each.

Used by the reach sweep (``tests/test_transformers_sweep.py``), ``reach.py`` and ``numerics.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

TEXT = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128}  # fmt: skip
DECODER = {**TEXT, "num_key_value_heads": 2, "max_position_embeddings": 64}
VISION = {"image_size": 32, "patch_size": 4, "num_channels": 3, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 128}  # fmt: skip
AUDIO = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
         "conv_dim": (32, 32), "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_conv_pos_embeddings": 16,
         "num_conv_pos_embedding_groups": 4, "vocab_size": 32}  # fmt: skip


def _tokens(batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(3, 120, (batch, length))}


def _image(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size)


def _specs() -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    import transformers as t

    def seq2seq() -> dict[str, torch.Tensor]:
        return {**_tokens(), "decoder_input_ids": torch.randint(3, 120, (2, 5))}

    return {
        "bert": (lambda: t.BertConfig(**TEXT), _tokens),
        "roberta": (lambda: t.RobertaConfig(**TEXT), _tokens),
        "distilbert": (lambda: t.DistilBertConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128),
                       _tokens),
        "albert": (lambda: t.AlbertConfig(**TEXT, embedding_size=32), _tokens),
        "electra": (lambda: t.ElectraConfig(**TEXT, embedding_size=32), _tokens),
        "gpt2": (lambda: t.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                      eos_token_id=2), _tokens),
        "gpt_neo": (lambda: t.GPTNeoConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                                           attention_types=[[["global", "local"], 1]], max_position_embeddings=64),
                    _tokens),
        "opt": (lambda: t.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64), _tokens),
        "bloom": (lambda: t.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4), _tokens),
        "falcon": (lambda: t.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
                   _tokens),
        "llama": (lambda: t.LlamaConfig(**DECODER), _tokens),
        "mistral": (lambda: t.MistralConfig(**DECODER), _tokens),
        "qwen2": (lambda: t.Qwen2Config(**DECODER), _tokens),
        "phi": (lambda: t.PhiConfig(**DECODER), _tokens),
        "t5": (lambda: t.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                  decoder_start_token_id=0), seq2seq),
        "bart": (lambda: t.BartConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                      decoder_ffn_dim=128, max_position_embeddings=64), seq2seq),
        "whisper": (lambda: t.WhisperConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2,
                                            encoder_attention_heads=4, decoder_attention_heads=4,
                                            encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                                            max_source_positions=30, max_target_positions=32, pad_token_id=0,
                                            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
                    lambda: {"input_features": torch.randn(2, 16, 60),
                             "decoder_input_ids": torch.randint(3, 120, (2, 5))}),
        "vit": (lambda: t.ViTConfig(**VISION), lambda: {"pixel_values": _image()}),
        "deit": (lambda: t.DeiTConfig(**VISION), lambda: {"pixel_values": _image()}),
        "clip_vision": (lambda: t.CLIPVisionConfig(**VISION), lambda: {"pixel_values": _image()}),
        "swin": (lambda: t.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                      window_size=4), lambda: {"pixel_values": _image()}),
        "convnext": (lambda: t.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
                     lambda: {"pixel_values": _image()}),
        "resnet": (lambda: t.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]),
                   lambda: {"pixel_values": _image()}),
        "regnet": (lambda: t.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8),
                   lambda: {"pixel_values": _image()}),
        "efficientnet": (lambda: t.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.2,
                                                      hidden_dim=320), lambda: {"pixel_values": _image()}),
        "mobilenet_v2": (lambda: t.MobileNetV2Config(image_size=32, depth_multiplier=0.25),
                         lambda: {"pixel_values": _image()}),
        "wav2vec2": (lambda: t.Wav2Vec2Config(**AUDIO), lambda: {"input_values": torch.randn(2, 800)}),
        "hubert": (lambda: t.HubertConfig(**AUDIO), lambda: {"input_values": torch.randn(2, 800)}),
    }


def names() -> list[str]:
    """The architectures of the sweep."""
    return list(_specs())


def build(name: str, seed: int = 0) -> tuple[nn.Module, Callable[[], Any]]:
    """``(model in eval mode, make_inputs)`` for architecture ``name`` (``make_inputs()`` gives a kwargs dict)."""
    from transformers import AutoModel

    make_config, make_inputs = _specs()[name]
    torch.manual_seed(seed)
    model = AutoModel.from_config(make_config(), attn_implementation="eager").eval()
    return model, make_inputs


def output(result: Any) -> torch.Tensor:
    """The main tensor of a transformers model output."""
    if hasattr(result, "last_hidden_state") and result.last_hidden_state is not None:
        return result.last_hidden_state
    return result[0]
