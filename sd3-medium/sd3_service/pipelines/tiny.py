"""A real StableDiffusion3Pipeline with tiny random weights, built in-process.

Every class is the production one (SD3 transformer, 16-channel VAE that downsamples by 8, two CLIP
text encoders with projection, T5 encoder, CLIP and T5 tokenizers); only the sizes are small and the
weights random, so demos and tests run on any CPU in seconds without downloading anything.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sd3_service.pipelines.dtypes import cast_as_loading_would

# Fixed so that every process builds the same weights: the same seed gives the same image across restarts.
WEIGHT_SEED = 0
CLIP_HIDDEN = 32
T5_HIDDEN = 2 * CLIP_HIDDEN  # SD3 pads the two concatenated CLIP states to the T5 width


def _clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with no merges: every byte is a token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=[], model_max_length=77)
    return tokenizer, len(tokens)


def _t5_tokenizer():
    """A T5 (SentencePiece unigram) tokenizer over single printable characters."""
    import string

    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + ["\u2581" + c for c in string.ascii_lowercase]
    pieces += list(string.ascii_letters + string.digits + string.punctuation)
    tokenizer = T5Tokenizer(vocab=[(p, -float(i)) for i, p in enumerate(pieces)], extra_ids=0, model_max_length=512)
    return tokenizer, len(pieces)


GATE_LIMIT_SECONDS = 600  # a gate nobody opens lets its generation go on after this


class GatedPipeline:
    """A pipeline with the tests' gates (`SD3_TINY_GATES`): a prompt `hold:<name> <prompt>` makes the image of
    `<prompt>`, but stops after its first step, leaves `<name>.held` in the gate folder, and goes on once
    `<name>.open` exists there. A test thereby holds a request running (or others queued behind it) exactly as long
    as it needs. Everything else is the pipeline's."""

    def __init__(self, pipe, gates: Path):
        self.pipe = pipe
        self.gates = gates

    def __call__(self, *args, prompt=None, callback_on_step_end=None, **kwargs):
        if isinstance(prompt, str) and prompt.startswith("hold:"):
            gate, _, prompt = prompt.partition(" ")  # the rest is the prompt: a held image is the one it would be
            callback_on_step_end = _held_after_first_step(self.gates / gate[5:], callback_on_step_end)
        return self.pipe(*args, prompt=prompt, callback_on_step_end=callback_on_step_end, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def _held_after_first_step(gate: Path, inner):
    def step_ended(pipeline, index, timestep, tensors):
        tensors = inner(pipeline, index, timestep, tensors) if inner is not None else tensors
        if index == 0:
            gate.with_suffix(".held").touch()
            deadline = time.monotonic() + GATE_LIMIT_SECONDS
            while not gate.with_suffix(".open").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return tensors

    return step_ended


def build_tiny_pipeline(dtype: torch.dtype = torch.float32):
    """Build the tiny SD3 pipeline on the CPU, in `dtype` except what transformers keeps in float32 (T5's `wo`)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tokenizer, clip_vocab = _clip_tokenizer()
    t5_tokenizer, t5_vocab = _t5_tokenizer()

    torch.manual_seed(WEIGHT_SEED)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_HIDDEN,
        caption_projection_dim=16, pooled_projection_dim=2 * CLIP_HIDDEN,
        pos_embed_max_size=96,  # 96 patches x 2 x 8 = 1536 px, the largest size the contract allows
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,  # SD3 Medium VAE values
    )
    clip_config = dict(
        hidden_size=CLIP_HIDDEN, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=CLIP_HIDDEN, vocab_size=clip_vocab, max_position_embeddings=77,
        bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1,
        hidden_act="gelu",
    )
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config))
    text_encoder_3 = T5EncoderModel(T5Config(
        d_model=T5_HIDDEN, d_ff=37, d_kv=8, num_heads=4, num_layers=1, vocab_size=t5_vocab,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
    )
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # freshly built modules start in training mode, with dropout on
            cast_as_loading_would(module, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe

