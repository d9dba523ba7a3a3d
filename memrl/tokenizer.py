"""Tokenizer wrapper: chat template for instruct models, raw text for base models, stop ids, real vocab size.

Qwen's embedding has more rows (151,936) than its tokenizer has tokens (151,665): the extra rows are padding
that must never be sampled. `Tokenizer.vocab_size` is the real count; the generator masks every id at or above it.

`make_byte_tokenizer` builds the small byte-level tokenizer the built-in synthetic task and the tests use, with
the repo's own code (no download): 256 byte tokens plus ChatML specials.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from memrl.errors import CheckpointError

# End-of-turn / end-of-text markers of the supported families; whichever exist in a vocabulary stop generation.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")

# ChatML, as Qwen uses it; for the byte tokenizer (real checkpoints bring their own template).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Tokenizer:
    def __init__(self, hf_tokenizer, chat: bool | None = None, extra_stop_ids=()):
        self.hf = hf_tokenizer
        # instruct models (a chat template present) get it by default; base models see raw text
        self.chat = bool(getattr(hf_tokenizer, "chat_template", None)) if chat is None else chat
        if self.chat and not getattr(hf_tokenizer, "chat_template", None):
            raise CheckpointError("chat=True but the tokenizer has no chat_template (tokenizer_config.json)")
        vocab = hf_tokenizer.get_vocab()
        stops = {vocab[t] for t in STOP_TOKENS if t in vocab}
        eos = hf_tokenizer.eos_token_id
        if eos is not None:
            stops.add(eos)
        self.stop_ids: set[int] = stops | set(extra_stop_ids)
        if not self.stop_ids:
            raise CheckpointError("tokenizer defines no end-of-sequence token: generation could never stop")
        self.vocab_size: int = len(hf_tokenizer)  # real tokens, added specials included
        # Thinking models (Qwen3) wrap their reasoning in <think> ... </think>, one token each; None elsewhere.
        # memrl.rollout reads the reply after the reasoning (reply_start).
        self.think_start_id: int | None = vocab.get("<think>")
        self.think_end_id: int | None = vocab.get("</think>")
        pad = hf_tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else min(self.stop_ids)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, chat: bool | None = None) -> "Tokenizer":
        from transformers import AutoTokenizer

        from memrl.hf_io import resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        try:
            hf = AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=False)
        except (OSError, ValueError, TypeError) as e:  # no or broken tokenizer files: transformers' own message
            raise CheckpointError(f"{ckpt}: no usable tokenizer ({type(e).__name__}: {str(e)[:300]})") from e
        if not hf.encode("Ann has 3 pens.", add_special_tokens=False):
            # transformers builds an empty tokenizer from a folder that lacks its vocabulary: refuse it, or every
            # prompt would encode to nothing
            raise CheckpointError(f"{ckpt}: the tokenizer has no vocabulary ({len(hf)} token(s)): tokenizer.json "
                                  f"(or vocab.json + merges.txt) is missing")
        extra = ()
        gen_cfg = ckpt / "generation_config.json"
        if gen_cfg.is_file():  # Qwen lists several eos ids here (<|im_end|> and <|endoftext|>)
            try:
                eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError) as e:
                raise CheckpointError(f"{gen_cfg}: not a JSON object ({e})") from e
            extra = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return cls(hf, chat=chat, extra_stop_ids=extra)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_prompt(self, user_text: str) -> list[int]:
        """One user message -> prompt ids ending where the assistant's answer begins."""
        if not self.chat:
            return self.encode(user_text)
        ids = self.hf.apply_chat_template(
            [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


def make_byte_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write a byte-level tokenizer (256 bytes + <|endoftext|>, <|im_start|>, <|im_end|>) loadable by AutoTokenizer."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins GPT-2 uses for bytes
    # order the 256 byte symbols by the byte they stand for, so id == byte value
    byte_to_char = _gpt2_bytes_to_unicode()
    assert set(byte_to_char.values()) == set(byte_chars)
    vocab = {byte_to_char[b]: b for b in range(256)}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (the ByteLevel pre-tokenizer's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
