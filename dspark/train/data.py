"""Draft-training data: read prompts/text, optionally regenerate responses with the target, store
token sequences on disk.

Inputs (``read_records``): DeepSpec-style jsonl (``{"turns": [...]}``; ``{"conversations":
[{"role", "content"}, ...]}``, ``{"text": ...}`` and ``{"prompt": ...}`` lines are read too),
plain text / source files, directories (every *.py, *.txt, *.rst, *.md, *.jsonl inside) and glob
patterns.

Responses (``build_samples``):
- ``"target"`` (the method's choice, docs/method.md "Training"): every record gives a prompt (the
  first user turn, or the first ``prompt_tokens`` tokens of each ``max_length`` window of a text)
  and the target itself writes the response (``gen_tokens`` new tokens, sampling parameters as
  given, stopping at its EOS). Loss mask = the response. The drafter then learns the target's own
  distribution, which is what it must predict at serving time.
- ``"as-is"``: the text is used as it is (windows of ``max_length`` tokens; turns joined with blank
  lines), loss mask = every token. Cheaper, but it teaches the corpus' distribution.

On-disk format (``save_samples``; one safetensors file per split): ``ids`` int32 [total tokens],
``loss_mask`` uint8 [total], ``offsets`` int64 [n + 1] (sample i = [offsets[i], offsets[i+1])),
``prompt_lens`` int64 [n] (prompt tokens at the start of each sample: held-out prompts for
calibration / evaluation); metadata ``{"format": "dspark-train-data", "version": "1", ...}``.
Target features and distributions are not stored: the trainer recomputes them online with the
frozen target (one forward per micro-batch), which costs less than reading them back.
"""
from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

TEXT_EXTS = (".py", ".txt", ".rst", ".md", ".jsonl")
FORMAT = "dspark-train-data"


@dataclass
class Sample:
    ids: list
    loss_mask: list
    prompt_len: int


def _expand(paths: Sequence[str]) -> list[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(TEXT_EXTS)]
        elif os.path.isfile(p):
            files.append(p)
        else:
            hits = sorted(glob.glob(p, recursive=True))
            if not hits:
                raise ValueError(f"no data at {p!r}")
            files += [h for h in hits if os.path.isfile(h)]
    return files


def _turns(obj) -> Optional[dict]:
    if isinstance(obj, dict):
        if isinstance(obj.get("turns"), list):
            return {"turns": [str(t) for t in obj["turns"]]}
        conv = obj.get("conversations") or obj.get("messages")
        if isinstance(conv, list):
            return {"turns": [str(m.get("content", "")) for m in conv if isinstance(m, dict)]}
        for key in ("text", "prompt", "content"):
            if isinstance(obj.get(key), str):
                return {"text": obj[key]} if key != "prompt" else {"turns": [obj[key]]}
    if isinstance(obj, str):
        return {"text": obj}
    return None


def read_records(paths: Sequence[str], max_bytes: Optional[int] = None,
                 seed: int = 0) -> list[dict]:
    """Records ``{"turns": [...]}`` (jsonl) or ``{"text": ...}`` (files) from files, dirs, globs.
    With ``max_bytes`` the files are read in a seeded random order until the budget is met."""
    out, total = [], 0
    files = _expand(paths)
    if max_bytes is not None:
        random.Random(seed).shuffle(files)
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                if f.endswith(".jsonl"):
                    for n, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            rec = _turns(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise ValueError(f"{f}:{n}: not JSON ({exc})") from None
                        if rec is None:
                            raise ValueError(f"{f}:{n}: expected a 'turns' list or 'text'")
                        out.append(rec)
                        total += len(line)
                else:
                    text = fh.read()
                    if text.strip():
                        out.append({"text": text})
                        total += len(text)
        except UnicodeDecodeError:
            continue
        if max_bytes is not None and total >= max_bytes:
            break
    if not out:
        raise ValueError(f"no usable records in {list(paths)}")
    return out


def read_prompt_texts(paths: Sequence[str]) -> list[str]:
    """Prompts, one rule for every command that takes a prompt file (``generate --prompt @F``,
    ``eval-draft`` / ``calibrate-draft --data``): a ``*.jsonl`` file gives one prompt per record
    (the first turn of ``{"turns": [...]}`` / ``conversations`` / ``messages``, or its ``prompt``
    / ``text``); any other file one prompt per non-empty line. (Training data, ``train-draft
    --data``, is a corpus instead: plain text is cut into windows, see :func:`read_records`.)"""
    out = []
    for f in _expand(paths):
        try:
            with open(f, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"{f}: not UTF-8 text") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if not f.endswith(".jsonl"):
                out.append(line)
                continue
            try:
                rec = _turns(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{f}:{n}: not JSON ({exc})") from None
            if rec is None or not (rec.get("turns") or rec.get("text")):
                raise ValueError(f"{f}:{n}: expected a 'turns' list, 'prompt' or 'text'")
            out.append(rec["turns"][0] if "turns" in rec else rec["text"])
    return out


def _windows(ids: list, size: int) -> Iterable[list]:
    for i in range(0, len(ids), size):
        w = ids[i:i + size]
        if len(w) >= 2:
            yield w


def prompts_and_texts(records: list[dict], tokenizer, max_length: int, prompt_tokens: int):
    """Token-level (prompt, full) pairs per record window (full = the as-is sequence)."""
    texts, kinds = [], []
    for r in records:
        if "turns" in r:
            texts.append(r["turns"][0] if r["turns"] else "")
            texts.append("\n\n".join(r["turns"]))
            kinds.append("turns")
        else:
            texts.append(r["text"])
            kinds.append("text")
    enc = tokenizer.encode_batch([t for t in texts])
    out, i = [], 0
    for kind in kinds:
        if kind == "turns":
            first, full = enc[i].ids, enc[i + 1].ids
            i += 2
            if full:
                first = first[-prompt_tokens:] if len(first) > prompt_tokens else first
                out.append((first or full[:1], full[:max_length]))
        else:
            ids = enc[i].ids
            i += 1
            for w in _windows(ids, max_length):
                out.append((w[:prompt_tokens], w))
    return out


def build_samples(records: list[dict], tokenizer, *, mode: str = "target", engine=None,
                  max_length: int = 1024, prompt_tokens: int = 64, gen_tokens: int = 256,
                  temperature: float = 0.7, top_k: int = 20, top_p: float = 0.8, seed: int = 42,
                  batch_size: int = 64, max_samples: Optional[int] = None,
                  min_loss_tokens: int = 14, progress=None) -> list[Sample]:
    """Token samples (see the module doc for the two modes); ``engine`` (a SpeculativeEngine on
    the target) writes the responses in ``"target"`` mode."""
    if mode not in ("target", "as-is"):
        raise ValueError(f"unknown response mode {mode!r} (target | as-is)")
    pairs = prompts_and_texts(records, tokenizer, max_length, prompt_tokens)
    random.Random(seed).shuffle(pairs)
    if max_samples is not None:
        pairs = pairs[:max_samples]
    samples = []
    if mode == "as-is":
        for prompt, full in pairs:
            if len(full) >= min_loss_tokens:
                samples.append(Sample(list(full), [1] * len(full), min(len(prompt), len(full))))
        return samples
    if engine is None:
        raise ValueError("response mode 'target' needs the target engine")
    room = max(1, min(gen_tokens, max_length - 1))
    batches = range(0, len(pairs), batch_size)
    for bi in (progress(batches) if progress else batches):
        chunk = [p[:max_length - room] or p[:1] for p, _ in pairs[bi:bi + batch_size]]
        gen = engine.generate_autoregressive(
            chunk, max_new_tokens=room, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=[seed + bi + j for j in range(len(chunk))])
        for prompt, resp in zip(chunk, gen.tokens, strict=True):
            if len(resp) >= min_loss_tokens:
                samples.append(Sample(list(prompt) + list(resp),
                                      [0] * len(prompt) + [1] * len(resp), len(prompt)))
    return samples


def split_samples(samples: list[Sample], heldout_frac: float, seed: int = 42):
    """(train, heldout): a seeded shuffle, heldout = the last round(frac * n) (>= 1 if frac > 0
    and there are >= 2 samples)."""
    idx = list(range(len(samples)))
    random.Random(seed + 1).shuffle(idx)
    n_held = int(round(heldout_frac * len(samples)))
    if heldout_frac > 0 and n_held == 0 and len(samples) >= 2:
        n_held = 1
    held = [samples[i] for i in idx[len(idx) - n_held:]] if n_held else []
    train = [samples[i] for i in idx[:len(idx) - n_held]]
    return train, held


def save_samples(path: str, samples: list[Sample], meta: Optional[dict] = None) -> None:
    from safetensors.torch import save_file
    lens = [len(s.ids) for s in samples]
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    if samples:
        offsets[1:] = torch.cumsum(torch.tensor(lens), 0)
    flat = [t for s in samples for t in s.ids]
    mask = [m for s in samples for m in s.loss_mask]
    tensors = {"ids": torch.tensor(flat, dtype=torch.int32),
               "loss_mask": torch.tensor(mask, dtype=torch.uint8), "offsets": offsets,
               "prompt_lens": torch.tensor([s.prompt_len for s in samples], dtype=torch.int64)}
    md = {"format": FORMAT, "version": "1"}
    md.update({k: json.dumps(v) for k, v in (meta or {}).items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path + ".tmp", metadata=md)
    os.replace(path + ".tmp", path)


def load_samples(path: str) -> list[Sample]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        md = f.metadata() or {}
        if md.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a dspark training-data file")
        t = {k: f.get_tensor(k) for k in f.keys()}
    off = t["offsets"].tolist()
    ids, mask, plen = t["ids"].tolist(), t["loss_mask"].tolist(), t["prompt_lens"].tolist()
    return [Sample(ids[off[i]:off[i + 1]], mask[off[i]:off[i + 1]], plen[i])
            for i in range(len(plen))]


def collate(samples: Sequence[Sample], max_length: int,
            device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, S] (pad id 0) and loss_mask [B, S] bool, truncated to max_length."""
    S = min(max_length, max(len(s.ids) for s in samples))
    ids = torch.zeros(len(samples), S, dtype=torch.int64)
    lm = torch.zeros(len(samples), S, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = min(S, len(s.ids))
        ids[b, :n] = torch.tensor(s.ids[:n])
        lm[b, :n] = torch.tensor(s.loss_mask[:n], dtype=torch.bool)
    return ids.to(device), lm.to(device)
