"""servefleet: serverless model serving on Ray, shaped as gRPC microservices."""

__version__ = "0.1.0"
