"""Tiny random-init diffusers video pipelines saved to a directory, text encoder and tokenizer included,
so ``dcache eval --model DIR --prompt ...`` runs the same path a real local checkpoint does.

The transformer and VAE are tests/tiny.py's; the tokenizer is a real ``tokenizers`` word-level
model behind transformers' fast-tokenizer class, and the text encoder the real class of each
pipeline (UMT5 for Wan, T5 for CogVideoX) at d_model 32, the transformers' ``text_dim``.
"""

from __future__ import annotations

import torch

import tiny  # tests/ is on sys.path (tests/conftest.py)

WORDS = ("a the of in on at red blue green cat dog bird car runs jumps flies drives field sky road "
         "over under slowly quickly").split()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _t5(cls_name: str, vocab: int):
    import transformers

    torch.manual_seed(0)
    cfg_cls = transformers.UMT5Config if cls_name == "UMT5EncoderModel" else transformers.T5Config
    cfg = cfg_cls(vocab_size=vocab, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                  relative_attention_num_buckets=8)
    return getattr(transformers, cls_name)(cfg).eval()


def save_wan(path: str) -> str:
    from diffusers import WanPipeline

    pipe, _, _, _ = tiny.wan()
    tok = tokenizer()
    WanPipeline(tokenizer=tok, text_encoder=_t5("UMT5EncoderModel", len(tok)), vae=pipe.vae,
                scheduler=pipe.scheduler, transformer=pipe.transformer).save_pretrained(path)
    return str(path)


def save_cogvideox(path: str) -> str:
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    pipe, _, _, _ = tiny.cogvideox()
    # tiny.cogvideox() takes embeddings of 16 tokens; encoding a prompt pads it to the pipeline's
    # default max_sequence_length, 226, which the transformer's positional table must cover.
    torch.manual_seed(0)
    tr = CogVideoXTransformer3DModel(**{**pipe.transformer.config, "max_text_seq_length": 226}).eval()
    tok = tokenizer()
    CogVideoXPipeline(tokenizer=tok, text_encoder=_t5("T5EncoderModel", len(tok)), vae=pipe.vae,
                      transformer=tr, scheduler=pipe.scheduler).save_pretrained(path)
    return str(path)


def save_wan_without_text_encoder(path: str) -> str:
    pipe, _, _, _ = tiny.wan()
    pipe.save_pretrained(path)
    return str(path)


def save_ltx(path: str) -> str:
    from diffusers import LTXPipeline

    pipe, _, _, _ = tiny.ltx()
    tok = tokenizer()
    LTXPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=_t5("T5EncoderModel", len(tok)), tokenizer=tok,
                transformer=pipe.transformer).save_pretrained(path)
    return str(path)
