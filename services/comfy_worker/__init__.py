"""ComfyWorker: the adapter in front of one GPU host's ComfyUI (HTTP + one /ws)."""
