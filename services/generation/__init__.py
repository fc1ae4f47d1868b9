"""GenerationService: the PostgreSQL queue, dispatch to ComfyWorkers, status streams
and the image store."""
