"""Baseline: a naive server, one forward per request at the request's exact length (no batching
across clients, no buckets), on the same TorchScript graph and tokenizer as the artifact.

    python benchmarks/naive_server.py ARTIFACT_DIR PORT
"""

import json
import sys
import threading

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from tokenizers import Tokenizer

artifact, port = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
manifest = json.loads(open(f"{artifact}/manifest.json").read())
graph = torch.jit.load(f"{artifact}/{manifest['buckets'][0]['file']}").eval()
tok = Tokenizer.from_file(f"{artifact}/tokenizer/tokenizer.json")
tok.enable_truncation(manifest["model"]["max_seq_length"])
tok.enable_padding(pad_id=manifest["pad_token_id"])
lock = threading.Lock()  # one forward at a time: the device is one device
app = FastAPI()


@app.post("/v1/embeddings")
def embeddings(body: dict) -> Response:
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    encs = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encs])
    mask = torch.tensor([e.attention_mask for e in encs])
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    with lock, torch.inference_mode():
        out = graph(*(inputs[n] for n in manifest["inputs"])).numpy()
    out = out / np.linalg.norm(out, axis=1, keepdims=True)
    tokens = int(mask.sum())
    data = [{"object": "embedding", "embedding": v.tolist(), "index": i} for i, v in enumerate(out)]
    payload = {"object": "list", "data": data, "model": manifest["model"]["name"],
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return Response(json.dumps(payload), media_type="application/json")


@app.get("/v1/models")
def models():
    return {"object": "list", "data": [{"id": manifest["model"]["name"], "object": "model"}]}


@app.get("/stats")
def stats():
    return {}


uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
