"""A tiny model made by the tests, never downloaded: a llama-architecture GGUF with random weights and a
real SentencePiece-style vocabulary, packed as an Ollama registry model (manifest, config and layers).

It answers chat requests with random text (the weights are noise) through Ollama's real loader, tokenizer,
template and sampler. Deterministic for a given seed, so the blob digests are stable across runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

# Small enough to write in well under a second and load in a few; big enough to be a real model
# (grouped-query attention, a gated FFN, two blocks).
EMBED = 64
HEADS = 4
KV_HEADS = 2
FFN = 128
BLOCKS = 2
CONTEXT = 4096

# SentencePiece control tokens the template uses: </s> closes a turn, the role markers open one.
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
ROLES = ("system", "user", "assistant")
WORDS = ("hello", "world", "the", "is", "tiny", "model", "random", "say", "hi", "kaos", "ollama",
         "answer", "question", "yes", "no", "and", "to", "of", "in")

# The chat template twice: Jinja in the GGUF (what llama.cpp and `ollama create` read), and the Go
# template layer that a pulled Ollama model carries (what /api/chat renders). Zephyr-style turns.
JINJA_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
OLLAMA_TEMPLATE = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n"
PARAMS = {"stop": [EOS, "<|user|>"]}

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL_TYPE = "application/vnd.ollama.image.model"
TEMPLATE_TYPE = "application/vnd.ollama.image.template"
PARAMS_TYPE = "application/vnd.ollama.image.params"


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types: control tokens, the 256 byte-fallback tokens (so any text encodes), then
    word pieces with the SentencePiece word-start marker."""
    tokens = [UNK, BOS, EOS, *(f"<|{role}|>" for role in ROLES)]
    types = [gguf.TokenType.UNKNOWN, *[gguf.TokenType.CONTROL] * (len(tokens) - 1)]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["\u2581", *string.ascii_letters, *string.digits, *string.punctuation,
              *(f"\u2581{c}" for c in string.ascii_lowercase), *(f"\u2581{w}" for w in WORDS)]
    pieces = list(dict.fromkeys(pieces))  # each token once: the loader refuses duplicates
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # Longer pieces score higher, so the tokenizer prefers whole words over letters.
    scores = [0.0] * (len(tokens) - len(pieces)) + [float(len(p)) - i * 1e-3 for i, p in enumerate(pieces)]
    return tokens, scores, [int(t) for t in types]


def _weights(rng: np.random.Generator, vocab: int) -> dict[str, np.ndarray]:
    head_dim = EMBED // HEADS

    def noise(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    # numpy shapes are (out, in): GGUF stores them reversed, as ggml expects.
    tensors = {
        "token_embd.weight": noise(vocab, EMBED),
        "output_norm.weight": np.ones(EMBED, dtype=np.float32),
        "output.weight": noise(vocab, EMBED),
    }
    for i in range(BLOCKS):
        tensors |= {
            f"blk.{i}.attn_norm.weight": np.ones(EMBED, dtype=np.float32),
            f"blk.{i}.attn_q.weight": noise(EMBED, EMBED),
            f"blk.{i}.attn_k.weight": noise(KV_HEADS * head_dim, EMBED),
            f"blk.{i}.attn_v.weight": noise(KV_HEADS * head_dim, EMBED),
            f"blk.{i}.attn_output.weight": noise(EMBED, EMBED),
            f"blk.{i}.ffn_norm.weight": np.ones(EMBED, dtype=np.float32),
            f"blk.{i}.ffn_gate.weight": noise(FFN, EMBED),
            f"blk.{i}.ffn_up.weight": noise(FFN, EMBED),
            f"blk.{i}.ffn_down.weight": noise(EMBED, FFN),
        }
    return tensors


def write_gguf(path: Path, seed: int = 0) -> None:
    tokens, scores, types = vocabulary()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("kaos-tiny")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(EMBED)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(EMBED // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(tokens.index(UNK))
    writer.add_bos_token_id(tokens.index(BOS))
    writer.add_eos_token_id(tokens.index(EOS))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(JINJA_TEMPLATE)
    for name, tensor in _weights(np.random.default_rng(seed), len(tokens)).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_bytes(seed: int = 0) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        write_gguf(path, seed)
        return path.read_bytes()


# --- as an Ollama registry serves it -----------------------------------------------------------------------


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class RegistryModel:
    """One model as a registry holds it: the manifest and every blob it names, by digest."""

    manifest: bytes
    blobs: dict[str, bytes]

    @property
    def model_digest(self) -> str:
        layers = json.loads(self.manifest)["layers"]
        return str(next(layer["digest"] for layer in layers if layer["mediaType"] == MODEL_TYPE))


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest(data), "size": len(data)}


@functools.cache  # deterministic; tests ask for it more than once
def registry_model(seed: int = 0) -> RegistryModel:
    layers = [
        (MODEL_TYPE, gguf_bytes(seed)),
        (TEMPLATE_TYPE, OLLAMA_TEMPLATE.encode()),
        (PARAMS_TYPE, json.dumps(PARAMS).encode()),
    ]
    config = json.dumps({
        "model_format": "gguf",
        "model_family": "llama",
        "model_families": ["llama"],
        "model_type": "1M",
        "file_type": "F32",
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [digest(data) for _, data in layers]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": _descriptor(CONFIG_TYPE, config),
        "layers": [_descriptor(t, data) for t, data in layers],
    }).encode()
    blobs = {digest(data): data for data in [config, *(data for _, data in layers)]}
    return RegistryModel(manifest, blobs)
