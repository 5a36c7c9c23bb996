"""The HTTP protocols a replica speaks, as pure functions over JSON values: OpenAI (`openai`),
rerank as Cohere and Jina shape it (`cohere`), TEI (`tei`) and KServe Open Inference Protocol v2
(`kserve`). Each module declares its
request and response types once (pydantic models, which feed `/openapi.json`), `parse(body, limits)`
turning a decoded body into a typed request (hand-written: no validation library on the hot path,
see docs/decisions.md), `format(...)` building the response body, and `error_body(e)` the
protocol's error shape. No Ray, no FastAPI, no engine: unit-tested on their own."""
