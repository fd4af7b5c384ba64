"""The Hugging Face models of ``scripts/coverage_transformers.py``: tiny configs and inputs.

:data:`MODELS` names each transformers class with its kind (encoder, decoder, seq2seq, audio,
speech2text, multimodal or vision) and the keyword arguments of a tiny config: hidden sizes 8-64,
2 layers or 1 block per stage, 4 heads, a vocabulary of 256, 32 px images (64 for MobileViT and
Segformer, 16 for Swin2SR). :data:`MORE_MODELS` names more classes by kind; their configs take
the shared tiny sizes they have keywords for (:func:`config_keywords`). :func:`build_model` builds
one with random weights (no download); :func:`example_inputs`
gives its keyword inputs: token IDs and an attention mask padding one row (``use_cache=False`` for
decoders; encoder-decoders add ``decoder_input_ids``), raw waveforms (``input_values``), log-mel
features with ``decoder_input_ids`` (Whisper), token IDs with images (CLIP), or ``pixel_values``;
the second inputs have another batch size (and, for text, another length and padding; for
waveforms another length).

transformers is imported only inside the functions, so that a process where it cannot be imported
can import this module.
"""

from __future__ import annotations

import warnings

VOCAB = 256
EXAMPLE_TEXT = (2, 12, {1: ("right", 3)})   # batch, length, row -> (side, padded tokens)
SECOND_TEXT = (3, 7, {1: ("left", 2), 2: ("right", 4)})
EXAMPLE_IMAGES, SECOND_IMAGES = 2, 3       # batch sizes
DEFAULT_SIDE = 32
EXAMPLE_SAMPLES, SECOND_SAMPLES = 400, 320  # waveform lengths
MEL_BINS, MEL_FRAMES = 16, 40                # Whisper's encoder takes exactly 2 x max_source_positions frames
DECODER_LENGTHS = (6, 4)                     # decoder_input_ids of the example and of the second input

_BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64)
_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
_GPT = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
_VIT = dict(image_size=DEFAULT_SIDE, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=16)
_WAV2VEC2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=4)
_STAGES4 = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])
_SWIN = dict(image_size=DEFAULT_SIDE, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
             window_size=4)

MODELS: dict[str, tuple[str, dict]] = {
    # encoders
    "BertModel": ("encoder", _BERT),
    "BertForSequenceClassification": ("encoder", {**_BERT, "num_labels": 3}),
    "RobertaModel": ("encoder", _BERT),
    "XLMRobertaModel": ("encoder", _BERT),
    "ElectraModel": ("encoder", {**_BERT, "embedding_size": 16}),
    "AlbertModel": ("encoder", {**_BERT, "embedding_size": 16}),
    "DistilBertModel": ("encoder", dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                        max_position_embeddings=64)),
    "DebertaModel": ("encoder", {**_BERT, "relative_attention": True, "pos_att_type": ["c2p", "p2c"],
                                 "max_relative_positions": -1}),
    "DebertaV2Model": ("encoder", {**_BERT, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                                   "position_buckets": 32, "max_relative_positions": -1,
                                   "position_biased_input": False, "norm_rel_ebd": "layer_norm",
                                   "share_att_key": True}),
    "MPNetModel": ("encoder", {**_BERT, "relative_attention_num_buckets": 32}),
    "ModernBertModel": ("encoder", {**_BERT, "local_attention": 8, "global_attn_every_n_layers": 2,
                                    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                    "cls_token_id": 1, "sep_token_id": 2}),
    "T5EncoderModel": ("encoder", dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                       num_heads=4, relative_attention_num_buckets=8,
                                       relative_attention_max_distance=16)),
    # decoders
    "GPT2LMHeadModel": ("decoder", _GPT),
    "GPTJForCausalLM": ("decoder", {**_GPT, "rotary_dim": 4}),
    "GPTNeoForCausalLM": ("decoder", dict(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32,
                                          num_layers=2, num_heads=4, intermediate_size=64, window_size=8,
                                          attention_types=[[["global", "local"], 1]])),
    "GPTNeoXForCausalLM": ("decoder", _LLAMA),
    "OPTForCausalLM": ("decoder", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                       num_attention_heads=4, max_position_embeddings=64,
                                       word_embed_proj_dim=32)),
    "BloomForCausalLM": ("decoder", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    "FalconForCausalLM": ("decoder", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4)),
    "LlamaForCausalLM": ("decoder", _LLAMA),
    "LlamaForSequenceClassification": ("decoder", {**_LLAMA, "num_labels": 3}),
    "MistralForCausalLM": ("decoder", _LLAMA),
    "MixtralForCausalLM": ("decoder", {**_LLAMA, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "Qwen2ForCausalLM": ("decoder", _LLAMA),
    "Qwen3ForCausalLM": ("decoder", {**_LLAMA, "head_dim": 8}),
    "Phi3ForCausalLM": ("decoder", _LLAMA),
    "PhiForCausalLM": ("decoder", _LLAMA),
    "GemmaForCausalLM": ("decoder", {**_LLAMA, "head_dim": 8}),
    "Gemma2ForCausalLM": ("decoder", {**_LLAMA, "head_dim": 8, "sliding_window": 8,
                                      "query_pre_attn_scalar": 8}),
    "StableLmForCausalLM": ("decoder", _LLAMA),
    "OlmoForCausalLM": ("decoder", _LLAMA),
    # encoder-decoders: text in, decoder_input_ids
    "BartForConditionalGeneration": ("seq2seq", _SEQ2SEQ),
    "MarianMTModel": ("seq2seq", _SEQ2SEQ),
    "T5ForConditionalGeneration": ("seq2seq", {**_T5, "decoder_start_token_id": 0}),
    # speech: raw waveforms (a weight-normed position conv), or log-mel features to text
    "Wav2Vec2Model": ("audio", _WAV2VEC2),
    "HubertModel": ("audio", _WAV2VEC2),
    "Wav2Vec2ConformerModel": ("audio", {**_WAV2VEC2, "conv_depthwise_kernel_size": 7,  # a GLU per block
                                         "position_embeddings_type": "relative"}),
    "WhisperForConditionalGeneration": ("speech2text", dict(
        vocab_size=VOCAB, num_mel_bins=MEL_BINS, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=MEL_FRAMES // 2, max_target_positions=32, pad_token_id=1,
        decoder_start_token_id=2)),
    # text and images together
    "CLIPModel": ("multimodal", dict(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=32),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, image_size=DEFAULT_SIDE, patch_size=8),
        projection_dim=16)),
    # vision
    "ViTModel": ("vision", _VIT),
    "ViTForImageClassification": ("vision", {**_VIT, "num_labels": 10}),
    "DeiTModel": ("vision", _VIT),
    "BeitModel": ("vision", {**_VIT, "use_relative_position_bias": True}),
    "Dinov2Model": ("vision", {**_VIT, "mlp_ratio": 2}),
    "CLIPVisionModel": ("vision", _VIT),
    "SiglipVisionModel": ("vision", _VIT),
    "ConvNextModel": ("vision", _STAGES4),
    "ConvNextV2Model": ("vision", _STAGES4),
    "ResNetModel": ("vision", dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])),
    "SwinModel": ("vision", _SWIN),
    "Swinv2Model": ("vision", _SWIN),
    "MobileViTModel": ("vision", dict(image_size=64, hidden_sizes=[32, 40, 48],
                                      neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64])),
    "Swin2SRForImageSuperResolution": ("vision", dict(  # upsampled by a pixel shuffle
        image_size=16, patch_size=1, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, upscale=2,
        upsampler="pixelshuffle")),
    "SegformerModel": ("vision", dict(image_size=64, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64],
                                      num_attention_heads=[1, 2, 2, 4], decoder_hidden_size=32)),
}
"""Model class name -> (kind: encoder, decoder, seq2seq, audio, speech2text, multimodal or vision;
keyword arguments of its config)."""

SHARED_SIZES = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, num_key_value_heads=2, head_dim=8, d_model=32, encoder_layers=2,
    decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
    decoder_ffn_dim=64, n_embd=32, n_layer=2, n_head=4, num_layers=2, num_heads=4, d_ff=64, d_kv=8,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, n_positions=64,
    embedding_size=16, image_size=DEFAULT_SIDE, patch_size=8, num_channels=3)
"""The tiny sizes of :data:`MORE_MODELS`: each config takes those of its keywords it has."""

MORE_MODELS: dict[str, str] = {
    **dict.fromkeys(("CamembertModel", "ConvBertModel", "FunnelModel", "LongformerModel", "BigBirdModel",
                     "XLNetModel", "MobileBertModel", "NystromformerModel", "RoFormerModel", "ErnieModel",
                     "CanineModel", "MegatronBertModel", "YosoModel", "FNetModel", "RemBertModel", "EsmModel",
                     "Data2VecTextModel", "MraModel", "IBertModel"), "encoder"),
    **dict.fromkeys(("GPTBigCodeForCausalLM", "Starcoder2ForCausalLM", "CohereForCausalLM", "GraniteForCausalLM",
                     "OlmoeForCausalLM", "Gemma3ForCausalLM", "PersimmonForCausalLM", "MptForCausalLM",
                     "XGLMForCausalLM", "BioGptForCausalLM", "CTRLLMHeadModel", "MambaForCausalLM",
                     "FalconMambaForCausalLM", "RwkvForCausalLM", "RecurrentGemmaForCausalLM", "JambaForCausalLM",
                     "NemotronForCausalLM", "GlmForCausalLM", "Olmo2ForCausalLM", "SmolLM3ForCausalLM",
                     "GPT2ForSequenceClassification", "Ernie4_5ForCausalLM", "HeliumForCausalLM",
                     "Exaone4ForCausalLM", "MiniMaxForCausalLM"), "decoder"),
    **dict.fromkeys(("PegasusForConditionalGeneration", "MBartForConditionalGeneration",
                     "BlenderbotForConditionalGeneration", "BlenderbotSmallForConditionalGeneration",
                     "LEDForConditionalGeneration", "ProphetNetForConditionalGeneration",
                     "M2M100ForConditionalGeneration", "MT5ForConditionalGeneration", "UMT5ForConditionalGeneration",
                     "LongT5ForConditionalGeneration", "PLBartForConditionalGeneration",
                     "NllbMoeForConditionalGeneration", "SwitchTransformersForConditionalGeneration",
                     "PegasusXForConditionalGeneration", "FSMTForConditionalGeneration"), "seq2seq"),
    **dict.fromkeys(("WavLMModel", "SEWModel", "SEWDModel", "UniSpeechModel", "UniSpeechSatModel",
                     "Data2VecAudioModel", "Wav2Vec2ForCTC", "HubertForSequenceClassification"), "audio"),
    **dict.fromkeys(("PoolFormerModel", "RegNetModel", "FocalNetModel", "MobileNetV2Model", "MobileNetV1Model",
                     "SwiftFormerModel", "Data2VecVisionModel", "Dinov2WithRegistersModel", "VitDetModel",
                     "UperNetForSemanticSegmentation", "DetrForObjectDetection", "ConditionalDetrModel"), "vision"),
}
"""More classes, by kind, each with the :data:`SHARED_SIZES` its config takes (audio encoders:
with the convolutional feature extractor of Wav2Vec2's tiny config); other keywords at their
defaults (some vision models stay large: their sizes go by other names)."""


def config_keywords(name: str) -> dict:
    """The keyword arguments of ``name``'s tiny config."""
    import inspect

    import transformers
    if name in MODELS:
        return MODELS[name][1]
    accepted = inspect.signature(getattr(transformers, name).config_class.__init__).parameters
    sizes = {**SHARED_SIZES, **_WAV2VEC2} if MORE_MODELS[name] == "audio" else SHARED_SIZES
    return {key: value for key, value in sizes.items() if key in accepted}


def kind_of(name: str) -> str:
    return MODELS[name][0] if name in MODELS else MORE_MODELS[name]


def _text_inputs(shape, config, decoder: bool, seed: int) -> dict:
    """Token IDs (never a special token below 4) and a 0/1 mask padding the rows of ``shape``."""
    import torch
    batch, length, padding = shape
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    pad_id = getattr(config, "pad_token_id", None) or 0
    for row, (side, count) in padding.items():
        padded = slice(0, count) if side == "left" else slice(length - count, length)
        attention_mask[row, padded] = 0
        input_ids[row, padded] = pad_id
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    return {**inputs, "use_cache": False} if decoder else inputs


def example_inputs(name: str, config, second: bool = False, seed: int = 0) -> dict:
    """The keyword inputs of ``name``: the example, or (``second``) one of another batch size and,
    for text, another length and padding."""
    import torch
    kind = kind_of(name)
    text_shape = SECOND_TEXT if second else EXAMPLE_TEXT
    generator = torch.Generator().manual_seed(seed + second)
    if kind in ("encoder", "decoder"):
        return _text_inputs(text_shape, config, kind == "decoder", seed + second)
    if kind == "seq2seq":
        return {**_text_inputs(text_shape, config, True, seed + second),
                "decoder_input_ids": _decoder_ids(text_shape[0], second, generator)}
    if kind == "audio":
        samples = SECOND_SAMPLES if second else EXAMPLE_SAMPLES
        return {"input_values": torch.randn(text_shape[0], samples, generator=generator)}
    if kind == "speech2text":
        return {"input_features": torch.randn(text_shape[0], MEL_BINS, MEL_FRAMES, generator=generator),
                "decoder_input_ids": _decoder_ids(text_shape[0], second, generator), "use_cache": False}
    if kind == "multimodal":
        return {**_text_inputs(text_shape, config, False, seed + second),
                "pixel_values": _images(config.vision_config, text_shape[0], generator)}
    return {"pixel_values": _images(config, SECOND_IMAGES if second else EXAMPLE_IMAGES, generator)}


def _decoder_ids(batch: int, second: bool, generator):
    import torch
    return torch.randint(4, VOCAB, (batch, DECODER_LENGTHS[second]), generator=generator)


def _images(config, batch: int, generator):
    import torch
    side = getattr(config, "image_size", DEFAULT_SIDE)
    side = side[0] if isinstance(side, (tuple, list)) else side
    return torch.randn(batch, 3, side, side, generator=generator)


def build_model(name: str, seed: int = 0):
    """``name`` from its tiny config, random weights seeded with ``seed``, in eval mode."""
    import torch
    import transformers
    model_class = getattr(transformers, name)
    config = model_class.config_class(**config_keywords(name))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_class(config).eval()


def describe(inputs: dict) -> str:
    """``input_ids=[2, 12], use_cache=False``: the inputs' names with their shapes or values."""
    return ", ".join(f"{key}={list(value.shape)}" if hasattr(value, "shape") else f"{key}={value!r}"
                     for key, value in inputs.items())
