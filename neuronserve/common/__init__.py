"""Pieces every layer shares and that import nothing else of neuronserve: console output, JSONL
texts, instance prices, and the Neuron SDK facts."""
