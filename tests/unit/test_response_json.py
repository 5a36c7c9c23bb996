"""Response JSON: float32 outputs go out as the shortest text that reads back to the same float32."""

import json

import numpy as np

from neuronserve.serve.app import dumps


def test_float32_arrays_are_written_short_and_read_back_exactly():
    v = np.array([0.1, 1 / 3, -2.5e-8, 0.0123456789], dtype=np.float32)
    text = dumps({"embedding": v, "index": 0})
    assert text == b'{"embedding":[0.1,0.33333334,-2.5e-8,0.012345679],"index":0}'
    back = np.array(json.loads(text)["embedding"], dtype=np.float32)
    assert back.tobytes() == v.tobytes()


def test_a_real_embedding_is_about_half_the_bytes_of_float64_text():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(384).astype(np.float32)
    v /= np.linalg.norm(v)
    short, long = dumps(v), json.dumps(v.tolist()).encode()
    assert np.array_equal(np.array(json.loads(short), dtype=np.float32), v)
    assert len(short) < 0.65 * len(long)
