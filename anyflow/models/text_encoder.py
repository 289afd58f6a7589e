"""Frozen text encoders that map prompts to ``[B, L, D]`` embeddings, exactly as Wan2.1's pipeline does:

    prompt → ftfy fix + HTML unescape + whitespace collapse → tokenizer (pad to L, truncate) → UMT5 encoder
           → hidden states with every position past the prompt's length set to zero

- :class:`UMT5TextEncoder` wraps transformers' ``UMT5EncoderModel`` and a tokenizer. For Wan it is UMT5-XXL
  from the Diffusers folder (bf16, L = 512); for the embedded toy it is a tiny random UMT5 with transformers'
  byte-level ByT5 tokenizer (no vocabulary file), seeded so that prompts map to fixed embeddings.
- Embeddings of repeated prompts are cached (the toy has a few dozen distinct captions).
"""

from __future__ import annotations

import html
import re
from collections import OrderedDict
from pathlib import Path

import ftfy
import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, ByT5Tokenizer, UMT5Config, UMT5EncoderModel

from anyflow.config import as_dtype


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ``ftfy.fix_text``, HTML unescaped twice, whitespace runs collapsed, stripped."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5TextEncoder(nn.Module):
    """Frozen UMT5 encoder + tokenizer; ``encode(prompts) -> [B, max_length, d_model]``."""

    def __init__(self, encoder: UMT5EncoderModel, tokenizer, max_length: int, cache_size: int = 256):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    @classmethod
    def tiny(cls, *, d_model: int = 64, num_layers: int = 2, num_heads: int = 4, d_ff: int = 128,
             max_length: int = 32, seed: int = 0, cache_size: int = 256) -> "UMT5TextEncoder":
        """A small random UMT5 with a byte-level tokenizer; deterministic given ``seed``."""
        tokenizer = ByT5Tokenizer()
        config = UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                            num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = UMT5EncoderModel(config)
        return cls(encoder, tokenizer, max_length, cache_size)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, max_length: int = 512, cache_size: int = 256,
                        torch_dtype: str | torch.dtype | None = None) -> "UMT5TextEncoder":
        """Load ``text_encoder/`` and ``tokenizer/`` from a Diffusers pipeline folder (Wan, AnyFlow or our export)."""
        from anyflow.models.pipeline import check_pipeline_folder

        folder = check_pipeline_folder(folder, ("text_encoder", "tokenizer"), what="text encoder folder")
        encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=as_dtype(torch_dtype))
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        return cls(encoder, tokenizer, max_length, cache_size)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")

    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> Tensor:
        prompts = [clean_prompt(p) for p in prompts]
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> Tensor:
        """Embeddings ``[B, max_length, d_model]`` with padding positions set to zero."""
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            for prompt, emb in zip(missing, self._encode(missing)):
                self._cache[prompt] = emb
        for p in prompts:
            self._cache.move_to_end(p)
        out = torch.stack([self._cache[p] for p in prompts])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def _apply(self, fn, recurse=True):  # moving devices invalidates cached tensors
        self._cache.clear()
        return super()._apply(fn, recurse)
