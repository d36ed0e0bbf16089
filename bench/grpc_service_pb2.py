"""Alias module for Ray Serve's side of bench/proxy.py.

tritonclient's generated messages carry the module name ``grpc_service_pb2`` (their .proto file),
so pickled requests and responses are looked up under it on Ray Serve's workers. The benchmark
puts this folder on the workers' path; nothing else imports it.
"""

from tritonclient.grpc.service_pb2 import ModelInferRequest, ModelInferResponse

__all__ = ["ModelInferRequest", "ModelInferResponse"]
