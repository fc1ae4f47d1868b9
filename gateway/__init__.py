"""The HTTP/JSON + server-sent-events front door, a client of GenerationService."""
