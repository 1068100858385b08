"""Tiny real models for the demo, tests and benchmarks: a small `LlamaForCausalLM` with a
character-level tokenizer saved as a real `tokenizer.json`, built in a second on a CPU."""

from __future__ import annotations

from pathlib import Path

CHARS = list(" 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-*/=<>:;,.?!()[]|#_'\"")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer():
    """A `PreTrainedTokenizerFast` with one token per character (vocabulary of SPECIALS + CHARS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama_config(
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 128,
    tied: bool = False,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(SPECIALS) + len(CHARS),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_tiny_llama(out: Path, *, seed: int = 0, dtype: str = "float32", **config_kwargs) -> Path:
    """Save a randomly initialised tiny Llama and its tokenizer to `out` (an HF model folder)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_kwargs)).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return Path(out)
