"""Generation: causal LMs served through vLLM's engine in a replica of our own (docs/generation.md).

`engine` wraps vLLM's async engine (imported only when a generation engine starts, so that serving
encoders never loads vLLM); `openai_api` is the OpenAI completions and chat protocol over it;
`deployment` the Ray Serve application that hosts both.
"""
