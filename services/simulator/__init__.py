"""A ComfyUI simulator faithful to the recorded API, with knobs for latency and faults."""
