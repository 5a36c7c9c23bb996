"""neuronserve: serve transformer models on AWS Inferentia2, Trainium and CPU with Ray Serve.

The one import name of the distribution. Its subpackages live in the repository's top-level
folders (`compile/`, `models/`, `serve/`, `deploy/`), mapped here by `pyproject.toml`;
`neuronserve.common` holds the small pieces every layer shares, and `neuronserve.cli` the command.
"""
