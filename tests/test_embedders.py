import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from cellvec.errors import EmbedderError
from cellvec.gene_store import build_gene_store
from cellvec.gene_store.embedders import available_embedders, get_embedder, model_slug
from cellvec.gene_store.embedders.minilm import minilm_path


def test_unknown_model_lists_known_ones():
    with pytest.raises(
        EmbedderError,
        match=r"Unknown embedding model 'bert-large'.*minilm.*st:NAME.*hf:NAME.*openai:NAME",
    ):
        get_embedder("bert-large")
    assert {"minilm", "st:NAME", "hf:NAME", "openai:NAME"} <= set(available_embedders())


def test_model_slug():
    assert model_slug("minilm") == "minilm"
    assert model_slug("st:/models/all-mpnet-base-v2/") == "st_all_mpnet_base_v2"
    assert model_slug("openai:text-embedding-3-small") == "openai_text_embedding_3_small"


def test_minilm_offline_and_meaningful():
    emb = get_embedder("minilm")
    v = emb.embed(
        ["T cell receptor signalling", "T lymphocyte antigen receptor", "liver bile acid synthesis"]
    )
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1


def test_st_by_local_path_matches_minilm():
    a = get_embedder(f"st:{minilm_path()}").embed(["CD3E T cell surface glycoprotein"])
    b = get_embedder("minilm").embed(["CD3E T cell surface glycoprotein"])
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A small BERT made here (config + vocab + random weights): the hf: path without a hub."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny-bert")
    words = [
        "the",
        "a",
        "of",
        "gene",
        "cell",
        "t",
        "b",
        "receptor",
        "signaling",
        "binding",
        "protein",
        "immune",
        "liver",
        "kinase",
        "activity",
        "process",
    ]
    (d / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n"
    )
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(d)
    return d


def test_hf_mean_pooling_on_local_tiny_bert(tiny_bert):
    emb = get_embedder(f"hf:{tiny_bert}")
    texts = [
        "t cell receptor signaling",
        "b cell receptor signaling",
        "liver kinase activity " * 40,
    ]
    v = emb.embed(texts)
    assert v.shape == (3, 32) and np.isfinite(v).all()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    # batching and padding do not change a text's vector (the attention mask is honoured)
    alone = emb.embed([texts[0]])
    np.testing.assert_allclose(alone[0], v[0], atol=1e-5)
    assert emb.config()["pooling"] == "mean" and emb.max_length == 64  # capped by the model


def test_hf_missing_model_is_clear(tmp_path):
    with pytest.raises(EmbedderError, match="Cannot load transformers model"):
        get_embedder(f"hf:{tmp_path / 'nothing'}").embed(["x"])


class _OpenAIHandler(BaseHTTPRequestHandler):
    calls: list = []
    fail_first = True

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(
            {
                "auth": self.headers.get("Authorization"),
                "n": len(body["input"]),
                "format": body.get("encoding_format"),
                "path": self.path,
            }
        )
        if self.headers.get("Authorization") == "Bearer bad-key":
            return self._send(
                401, {"error": {"message": "Incorrect API key", "type": "invalid_request_error"}}
            )
        if type(self).fail_first:
            type(self).fail_first = False
            return self._send(
                429,
                {"error": {"message": "Rate limit", "type": "rate_limit"}},
                {"retry-after-ms": "10"},
            )
        data = []
        for i, text in enumerate(body["input"]):
            v = np.zeros(16, dtype=np.float32)
            for w in text.split():
                v[hash_word(w) % 16] += 1
            emb = (
                base64.b64encode(v.tobytes()).decode()
                if body.get("encoding_format") == "base64"
                else v.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        self._send(
            200,
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            },
        )

    def _send(self, code, obj, headers=None):
        raw = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)


def hash_word(w: str) -> int:
    import hashlib

    return int(hashlib.md5(w.encode()).hexdigest()[:6], 16)


@pytest.fixture
def openai_server():
    _OpenAIHandler.calls = []
    _OpenAIHandler.fail_first = True
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _OpenAIHandler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_openai_real_client_against_local_server(openai_server, monkeypatch, gene_files, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    emb = get_embedder("openai:text-embedding-3-small", base_url=openai_server)
    res = build_gene_store(
        gene_files["gene_info"],
        gene2go=gene_files["gene2go"],
        store=tmp_path / "s",
        species="human",
        embedder=emb,
    )
    assert (
        res.n_genes == 30 and res.meta["dimension"] == 16 and res.meta["base_url"] == openai_server
    )
    calls = _OpenAIHandler.calls
    assert len(calls) >= 2 and calls[0]["n"] == calls[1]["n"]  # 429 first, then the retry succeeded
    assert all(c["auth"] == "Bearer sk-test" and c["path"] == "/v1/embeddings" for c in calls)
    assert calls[-1]["format"] == "base64"


def test_openai_batches_within_limits(openai_server, monkeypatch):
    from cellvec.gene_store.embedders.openai_api import MAX_INPUTS

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    emb = get_embedder("openai:text-embedding-ada-002", base_url=openai_server)
    v = emb.embed([f"gene {i}" for i in range(MAX_INPUTS + 10)], batch_size=5000)
    assert v.shape == (MAX_INPUTS + 10, 16)
    assert max(c["n"] for c in _OpenAIHandler.calls) <= MAX_INPUTS


def test_openai_401_is_clear(openai_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "bad-key")
    with pytest.raises(EmbedderError, match=r"rejected the API key \(401\).*OPENAI_API_KEY"):
        get_embedder("openai:text-embedding-3-small", base_url=openai_server).embed(["x"])


def test_openai_missing_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(EmbedderError, match="set the OPENAI_API_KEY environment variable"):
        get_embedder("openai:text-embedding-3-small").embed(["x"])
