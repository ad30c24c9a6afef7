"""What users run on a loaded model: generate (with per-run figures), chat, the OpenAI server."""
