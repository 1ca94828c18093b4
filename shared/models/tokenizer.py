"""The real CLIP tokenizer, built offline from open_clip's bundled BPE file.

`assets/bpe_simple_vocab_16e6.txt.gz` comes from the open_clip_torch 3.3.0 wheel (MIT, see
`assets/LICENSE-open_clip.txt`). It holds the same merges as OpenAI's CLIP, so the tokenizer built here
gives the ids Stable Diffusion's text encoders were trained on ("a photo of a cat" →
49406 320 1125 539 320 2368 49407) without downloading anything.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BPE_ASSET = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's context length; transformers would otherwise default model_max_length to ~1e30.
CLIP_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# open_clip's SimpleTokenizer keeps the first 49152 - 256 - 2 merges: 256 byte tokens, 256 byte+</w>
# tokens, 48894 merges and 2 specials make the 49408-token vocabulary of CLIP's embedding table.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (as open_clip's `bytes_to_unicode`)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + shift)
            shift += 1
    return dict(zip(byte_values, [chr(c) for c in code_points], strict=True))


@cache
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The token → id map (49,408 entries) and the merge list (48,894 pairs), as open_clip builds them."""
    with resources.files(__package__).joinpath("assets", BPE_ASSET).open("rb") as handle:
        lines = gzip.decompress(handle.read()).decode("utf-8").split("\n")
    # Line 0 is the "#version" header.
    merges = tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or any(len(merge) != 2 for merge in merges):
        raise RuntimeError(f"{BPE_ASSET} is not the CLIP BPE file: got {len(vocab)} tokens, {len(merges)} merges")
    return vocab, cast(tuple[tuple[str, str], ...], merges)  # every merge is a pair (checked above)


def write_clip_tokenizer_files(directory: str | Path) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` (the GPT-2/CLIP BPE format) into `directory`.

    Returns `(vocab_path, merges_path)`; the directory is created if missing.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text(
        "#version: 0.2\n" + "".join(f"{first} {second}\n" for first, second in merges), encoding="utf-8"
    )
    return vocab_path, merges_path


def build_clip_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """The CLIP tokenizer of Stable Diffusion, with `model_max_length=77`.

    `pad_token` is `<|endoftext|>` for SD 1.x and SDXL's first tokenizer; SDXL's second (OpenCLIP)
    tokenizer pads with `"!"` (id 0).
    """
    # lazy: loads transformers, PIL, numpy, …
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="krona-clip-tokenizer-") as directory:
        vocab_path, merges_path = write_clip_tokenizer_files(directory)
        # Paths, positionally: transformers 4 names these vocab_file/merges_file, transformers 5
        # vocab/merges, and both read them while constructing (nothing refers to the files later).
        return CLIPTokenizer(
            str(vocab_path),
            str(merges_path),
            pad_token=pad_token,
            model_max_length=CLIP_MAX_LENGTH,
        )
