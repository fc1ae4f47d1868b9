"""The one place hand-written code imports the generated protobuf modules from.

Generated code lives in `services.generated` (see scripts/generate_protos.py);
everything else says `from services.contracts import gen, gen_grpc, worker, worker_grpc`.
"""

from services.generated.lockn.comfyworker.v1 import comfy_worker_pb2 as worker
from services.generated.lockn.comfyworker.v1 import comfy_worker_pb2_grpc as worker_grpc
from services.generated.lockn.generation.v1 import generation_pb2 as gen
from services.generated.lockn.generation.v1 import generation_pb2_grpc as gen_grpc

__all__ = ["gen", "gen_grpc", "worker", "worker_grpc"]
