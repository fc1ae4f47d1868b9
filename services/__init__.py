"""LockN Gen: a durable gRPC job queue in front of ComfyUI."""
