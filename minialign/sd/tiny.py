"""A random tiny `StableDiffusionPipeline` built from configs, offline, for unit tests (issue 12, source (c)).

Same diffusers/transformers classes as Stable Diffusion 1.x, a few hundred thousand parameters each:
UNet2DConditionModel (block_out_channels (32, 64), cross-attention dim 32), AutoencoderKL (32, 64; latents
of 4 channels at half the image size), CLIPTextModel (hidden 32) and a CLIPTokenizer over a small caption
vocabulary written here (BPE merges that spell each word from its characters), DDIMScheduler with SD's
scaled-linear betas and `steps_offset=1`. Deviation from SD: `set_alpha_to_one=True`, so the last DDIM step
lands on abar = 1 as the shared sampler's does (SD 1.x's False lands on abar_0: `final_timestep_of`).
"""
from __future__ import annotations

import string

import torch

WORDS = ("a", "an", "digit", "photo", "of", "the", "number",
         "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "red", "green", "blue", "yellow", "white", "black", "orange", "purple", "bright", "dark")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def make_tokenizer(words=WORDS, max_length: int = 16):
    """A CLIPTokenizer whose BPE spells `words` (any lowercase word falls back to characters).

    Vocabulary: the special tokens, each letter with and without the end-of-word mark `</w>`, and every
    merge result; merges join a word's pieces left to right, e.g. (r, e) -> re, (re, d</w>) -> red</w>.
    BPE applies merges in list order, so the words are taken longest first: otherwise the merge (r, e) of "red"
    fires inside "green" before green's own and strands it as 4 tokens. Each word is checked to be one token.
    """
    from transformers import CLIPTokenizer

    if not isinstance(max_length, int) or max_length < 3:
        raise ValueError(f"max_length must be an int >= 3, got {max_length!r}")
    tokens = [BOS, EOS] + list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges = []
    for w in words:
        if not isinstance(w, str) or not w.isalpha() or not w.islower():
            raise ValueError(f"words must be lowercase letters only, got {w!r}")
    words = sorted(dict.fromkeys(words), key=lambda w: (-len(w), w))
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
                tokens.append(left + right)
            left = left + right
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                        model_max_length=max_length)
    if len(tok) != len(vocab):
        raise RuntimeError(f"the tokenizer has {len(tok)} tokens, expected {len(vocab)}")
    split = [w for w in words if len(tok.tokenize(w)) != 1]
    if split:
        raise RuntimeError(f"the words {split} are not single tokens")
    return tok


def text_encoder(tokenizer, hidden: int = 32, intermediate: int = 37, layers: int = 2, heads: int = 4):
    """A random CLIPTextModel for `tokenizer` (its vocabulary, special ids and max length), hidden size `hidden`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=hidden))


def tiny_pipeline(seed: int = 0, sample_size: int = 8, max_length: int = 16):
    """A random tiny StableDiffusionPipeline (no safety checker), eval mode, float32, on the CPU.

    sample_size: the latent side (images are 2x larger: the VAE has two blocks, one downsampling).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    if not isinstance(sample_size, int) or sample_size < 4 or sample_size % 4:
        raise ValueError(f"sample_size must be a positive multiple of 4, got {sample_size!r}")
    tokenizer = make_tokenizer(max_length=max_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=8, sample_size=2 * sample_size)
    text = text_encoder(tokenizer)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for m in (unet, vae, text):
        m.eval()
    return pipe
