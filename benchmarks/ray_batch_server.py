"""The anchor users write themselves: plain Ray Serve `@serve.batch` (batch 32, 10 ms wait),
padding each batch to its longest text, on the same graph and tokenizer as the artifact.
`max_ongoing_requests` is raised to 64 (Ray's default of 5 caps the batch at 5 rows).

    python benchmarks/ray_batch_server.py ARTIFACT_DIR PORT
"""

import json
import sys

artifact, port = sys.argv[1], int(sys.argv[2])

import numpy as np  # noqa: E402
from bench_common import serve_until_signalled  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from ray import serve  # noqa: E402

api = FastAPI()


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 2})
@serve.ingress(api)
class PlainBatching:
    def __init__(self, artifact: str):
        import torch
        from tokenizers import Tokenizer

        torch.set_num_threads(2)
        self.torch = torch
        self.manifest = json.loads(open(f"{artifact}/manifest.json").read())
        self.graph = torch.jit.load(f"{artifact}/{self.manifest['buckets'][0]['file']}").eval()
        self.tok = Tokenizer.from_file(f"{artifact}/tokenizer/tokenizer.json")
        self.tok.enable_truncation(self.manifest["model"]["max_seq_length"])
        self.tok.enable_padding(pad_id=self.manifest["pad_token_id"])
        self.real = self.padded = 0

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def embed(self, texts: list[str]) -> list:
        torch = self.torch
        encs = self.tok.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encs])
        mask = torch.tensor([e.attention_mask for e in encs])
        self.real += int(mask.sum())
        self.padded += ids.numel()
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        with torch.inference_mode():
            out = self.graph(*(inputs[n] for n in self.manifest["inputs"])).numpy()
        out = out / np.linalg.norm(out, axis=1, keepdims=True)
        return [(v.tolist(), int(m.sum())) for v, m in zip(out, mask)]

    @api.post("/v1/embeddings")
    async def embeddings(self, body: dict):
        vec, tokens = await self.embed(body["input"])
        return {"object": "list", "data": [{"object": "embedding", "embedding": vec, "index": 0}],
                "model": self.manifest["model"]["name"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.manifest["model"]["name"], "object": "model"}]}

    @api.get("/stats")
    async def stats(self):
        return {"real_tokens": self.real, "padded_tokens": self.padded}


serve_until_signalled(PlainBatching.bind(artifact), "plain", port, "ready")
