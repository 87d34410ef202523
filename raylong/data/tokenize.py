"""Tokenizers: train a local byte-level BPE, encode documents, encode conversations with label masks."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raylong.data.packing import IGNORE

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]
CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()


def train_bpe_tokenizer(files_glob: str, vocab_size: int, out_dir: str, max_files: int = 400) -> str:
    """Train a byte-level BPE on local text files; save a transformers tokenizer dir with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(files_glob, recursive=True))[:max_files]
    if not files:
        raise FileNotFoundError(f"tokenizer.train.files matched no files: {files_glob}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: str):
    """Load a transformers tokenizer; give it raylong's generation-tagged chat template if it has none
    that marks assistant tokens (Llama-3.1's own template does not)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template or "{% generation %}" not in tok.chat_template.replace("{%-", "{%"):
        tok.chat_template = CHAT_TEMPLATE
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_documents(tok, texts: list[str], separator: str = "eos") -> list[np.ndarray]:
    """Each document as BOS + tokens (+ EOS when separator == 'eos')."""
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    head, tail = _document_ends(tok, separator)
    return [np.asarray(head + ids + tail, dtype=np.int32) for ids in encoded]


def _document_ends(tok, separator: str) -> tuple[list[int], list[int]]:
    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    tail = [tok.eos_token_id] if separator == "eos" else []
    return head, tail


@dataclass(frozen=True)
class DocumentEncoder:
    """`encode_documents` without transformers: the fast tokenizer's own backend (its JSON, taken from the
    driver's loaded tokenizer) and the ids around each document. A tokenizer actor builds it in ~0.1 s
    instead of the ~2.5 s of importing transformers, and it reads no file (the tokenizer may sit on s3)."""

    backend_json: str
    head: tuple[int, ...]
    tail: tuple[int, ...]

    @classmethod
    def of(cls, tok, separator: str = "eos") -> DocumentEncoder | None:
        """None when `tok` has no `tokenizers` backend (a slow tokenizer): the actor then loads it whole."""
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            return None
        head, tail = _document_ends(tok, separator)
        return cls(backend.to_str(), tuple(head), tuple(tail))

    def load(self):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.backend_json)
        backend.no_truncation()  # as transformers calls it: whole documents, unpadded
        backend.no_padding()
        return backend

    def encode(self, backend, texts: list[str], threads: int | None = None) -> list[np.ndarray]:
        """threads=1: one document at a time on this thread (a process per CPU is the parallelism);
        None: the backend's batch encoding on all cores."""
        head, tail = list(self.head), list(self.tail)
        encoded = ([backend.encode(t, add_special_tokens=False) for t in texts] if threads == 1
                   else backend.encode_batch(texts, add_special_tokens=False))
        return [np.asarray(head + e.ids + tail, dtype=np.int32) for e in encoded]


def encode_conversation(tok, messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and labels of one conversation: labels are the ids on assistant tokens, -100 elsewhere."""
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, add_generation_prompt=False
    )
    ids = np.asarray(out["input_ids"], dtype=np.int32)
    mask = np.asarray(out["assistant_masks"], dtype=bool)
    labels = np.where(mask, ids, IGNORE).astype(np.int32)
    return ids, labels
